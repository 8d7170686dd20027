"""Language-model quality at equal MACs: fxprune's policies and criteria vs Torch-Pruning's LLM pruning.

No pretrained language model can be downloaded here, so this tool trains one:

* **Data**: the Python standard library's own source (``Lib/*.py`` of the running interpreter,
  ``sysconfig.get_paths()['stdlib']``) and its reference docs (``pydoc_data.topics``), as bytes
  (a byte-level vocabulary of 256). Files are split deterministically: a file is held out when the
  CRC-32 of its name is 0 mod 10 (the docs are training text). Perplexity is measured on
  non-overlapping 128-byte windows of the held-out files (``--eval-windows`` of them), as
  ``exp(mean next-byte NLL)``.
* **Model**: a LLaMA-architecture ``LlamaForCausalLM`` (hidden 384, 6 layers, 6 heads of 64, MLP
  1024, untied embeddings: 10.8 M parameters), trained from scratch with AdamW
  (``--train-steps`` steps of 16 x 128 bytes, warm-up then cosine). The trained checkpoint is
  cached (``save_pretrained``) under ``--cache`` keyed by the configuration and the data, so
  later runs skip the training.
* **fxprune**: for every criterion (``l2``, ``taylor``, ``activation``, ``activation_l2``; ``l1``
  on request; the data-driven ones calibrated on 8 training batches of 8 x 128 bytes) and policy (``uniform``,
  ``global``; ``isomorphic`` on request: with every role tied across layers it plans like
  ``global``; ``agentic`` with the offline analyst, scoring candidates by fidelity on the
  calibration batches, for ``activation``), the model is compiled
  to each MAC budget (50% and 30% by default, MACs counted at batch 1 x 128 bytes) with the
  default ``layer_uniform`` (one keep count per role in every layer, so ``result.to_hf()``
  rebuilds a ``LlamaForCausalLM``), and with ``layer_uniform=False`` for ``global`` +
  ``activation`` (per-layer widths; the GraphModule is fine-tuned then, on the CPU: captured graphs
  still carry capture-time device asserts).
* **Torch-Pruning** 1.6.1, the approach of its ``examples/LLMs/prune_llm.py``: ``MetaPruner`` with
  ``GroupMagnitudeImportance(p=2, group_reduction="mean")``, local (uniform) pruning of the hidden
  size, the heads (``num_heads`` of q/k/v, ``prune_num_heads=True``, ``prune_head_dims=False``,
  ``head_pruning_ratio`` = the pruning ratio) and the MLP, ``lm_head`` ignored, ``round_to=4``;
  then the attention modules' ``num_key_value_groups`` and the config are updated (transformers
  5 reads widths from the config and ``-1`` views). The pruning ratio is bisected to the largest
  MACs at or under the same budget (``fxprune.count_macs`` on the same input). The model uses
  multi-head attention because Torch-Pruning 1.6.1's ``get_all_groups`` does not return (hours) on
  transformers 5's grouped-query attention (``repeat_kv``'s expand/reshape).
* **Recovery**: every pruned model gets the same distillation, ``fxprune.finetune`` with the
  unpruned model as teacher (token-level KL), ``--recover-steps`` AdamW steps of 8 x 128 bytes
  of training text (the same batches for every model), and held-out perplexity is measured before
  and after.

Perplexity is a correctness number (it does not depend on machine load). The table is printed
as Markdown; ``--json`` writes every row.

    python tools/bench_llm.py                                  # the full benchmark (~40 min, 2 cores)
    python tools/bench_llm.py --quick                          # a smoke test (tiny model, minutes)
    python tools/bench_llm.py --budgets 50% --criteria activation l2 --policies global
"""

from __future__ import annotations

import argparse
import copy
import glob
import hashlib
import json
import logging
import math
import os
import sys
import sysconfig
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx
import torch.nn as nn

import fxprune
from fxprune._io import atomic_write
from fxprune.finetune import finetune as run_finetune

SEQ = 128
CRITERIA = ("l1", "l2", "taylor", "activation", "activation_l2")
DEFAULT_CRITERIA = ("l2", "taylor", "activation", "activation_l2")  # l1 ranks like l2 here
POLICIES = ("uniform", "global", "isomorphic")
DEFAULT_POLICIES = ("uniform", "global")  # isomorphic equals global when every role is tied across layers


# ------------------------------------------------------------------------------------------ data

@dataclass
class Corpus:
    train: np.ndarray  # uint8 bytes
    heldout: np.ndarray
    files_train: int
    files_heldout: int
    sha: str


def load_corpus() -> Corpus:
    """Standard-library sources (+ the pydoc topics) as bytes, split by file name (module doc)."""
    lib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(lib, "*.py")))
    if not files:
        raise SystemExit(f"no standard-library sources under {lib}")
    train, held = [], []
    for f in files:
        data = Path(f).read_bytes()
        (held if zlib.crc32(os.path.basename(f).encode()) % 10 == 0 else train).append(data)
    try:
        from pydoc_data.topics import topics

        train.append("\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8", "replace"))
    except ImportError:  # pragma: no cover - some distributions strip it
        pass
    tr = np.frombuffer(b"\n".join(train), dtype=np.uint8)
    he = np.frombuffer(b"\n".join(held), dtype=np.uint8)
    sha = hashlib.sha256(tr.tobytes() + b"|" + he.tobytes()).hexdigest()[:16]
    return Corpus(tr, he, len(train), len(held), sha)


def random_batches(data: np.ndarray, n: int, batch: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` batches of ``batch`` random windows of SEQ bytes (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        starts = rng.integers(0, len(data) - SEQ - 1, size=batch)
        ids = torch.from_numpy(np.stack([data[s:s + SEQ] for s in starts]).astype(np.int64))
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def eval_windows(data: np.ndarray, n: int) -> torch.Tensor:
    """The first ``n`` non-overlapping SEQ-byte windows of the held-out text, evenly spread."""
    total = len(data) // SEQ
    idx = np.linspace(0, total - 1, num=min(n, total)).astype(np.int64)
    return torch.from_numpy(np.stack([data[i * SEQ:(i + 1) * SEQ] for i in idx]).astype(np.int64))


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch: int = 16) -> float:
    model.eval()
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in range(0, len(windows), batch):
        ids = windows[i:i + batch].to(device)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
        logits = out["logits"] if isinstance(out, dict) else out.logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 ids[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += ids[:, 1:].numel()
    return math.exp(nll / count)


# ----------------------------------------------------------------------------------------- model

def model_config(quick: bool):
    import transformers

    if quick:
        kw = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4)
    else:  # multi-head attention: Torch-Pruning 1.6.1 hangs grouping transformers 5's GQA (repeat_kv)
        kw = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
                  num_key_value_heads=6)
    return transformers.LlamaConfig(vocab_size=256, max_position_embeddings=512, tie_word_embeddings=False,
                                    bos_token_id=None, eos_token_id=None, pad_token_id=None, **kw)


def train_model(args, corpus: Corpus, log) -> tuple[nn.Module, dict]:
    """Train (or load the cached) LLaMA; returns the model and its training record."""
    import transformers

    cfg = model_config(args.quick)
    key = hashlib.sha256(json.dumps({"cfg": cfg.to_dict(), "steps": args.train_steps, "seed": args.seed,
                                     "data": corpus.sha, "lr": args.train_lr, "v": 1}, sort_keys=True,
                                    default=str).encode()).hexdigest()[:16]
    where = Path(args.cache) / f"llama-{key}"
    record_path = where / "train.json"
    if record_path.exists():
        model = transformers.LlamaForCausalLM.from_pretrained(where).eval()
        log(f"loaded the trained model from {where}")
        return model, json.loads(record_path.read_text())
    torch.manual_seed(args.seed)
    model = transformers.LlamaForCausalLM(cfg).to(args.device)
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=args.train_lr, weight_decay=0.1, betas=(0.9, 0.95))
    warm = max(1, args.train_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, args.train_steps) / args.train_steps)))
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    model.train()
    losses = []
    for step in range(args.train_steps):
        starts = rng.integers(0, len(corpus.train) - SEQ - 1, size=16)
        ids = torch.from_numpy(np.stack([corpus.train[s:s + SEQ] for s in starts]).astype(np.int64)).to(args.device)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % max(1, args.train_steps // 10) == 0 or step == args.train_steps - 1:
            log(f"train step {step + 1}/{args.train_steps}: loss {np.mean(losses[-20:]):.3f} "
                f"({time.perf_counter() - t0:.0f}s)")
    model.eval().cpu()
    model.config.use_cache = True
    record = {"steps": args.train_steps, "seconds": time.perf_counter() - t0, "final_loss": float(np.mean(losses[-20:])),
              "params": sum(p.numel() for p in model.parameters()), "device": str(args.device)}
    where.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(where)
    atomic_write(record_path, json.dumps(record))
    return model, record


# --------------------------------------------------------------------------------- Torch-Pruning

def llama_macs(cfg, seq: int = SEQ, batch: int = 1) -> int:
    """Analytic MACs of a LlamaForCausalLM forward (fxprune's convention: full L x L attention)."""
    d, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    per_tok = d * q + 2 * d * kv + q * d + 3 * d * cfg.intermediate_size
    attn = 2 * seq * q
    return batch * seq * (cfg.num_hidden_layers * (per_tok + attn) + d * cfg.vocab_size)


def tp_prune(model: nn.Module, ratio: float) -> nn.Module:
    """Torch-Pruning's LLM recipe (examples/LLMs/prune_llm.py) on a copy, config updated."""
    import torch_pruning as tp

    m = copy.deepcopy(model)
    m.config.use_cache = False
    num_heads = {}
    for name, mod in m.named_modules():
        if name.endswith("self_attn"):
            num_heads[mod.q_proj] = m.config.num_attention_heads
            num_heads[mod.k_proj] = m.config.num_key_value_heads
            num_heads[mod.v_proj] = m.config.num_key_value_heads
    ids = torch.randint(0, m.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    pruner = tp.pruner.MetaPruner(
        m, example_inputs=ids, importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        global_pruning=False, pruning_ratio=ratio, ignored_layers=[m.lm_head], num_heads=num_heads,
        prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=ratio, round_to=4)
    for group in pruner.step(interactive=True):
        group.prune()
    cfg = m.config
    cfg.hidden_size = m.lm_head.in_features
    for name, mod in m.named_modules():
        if name.endswith("self_attn"):
            mod.num_key_value_groups = mod.q_proj.out_features // mod.k_proj.out_features
            cfg.num_attention_heads = mod.q_proj.out_features // mod.head_dim
            cfg.num_key_value_heads = mod.k_proj.out_features // mod.head_dim
        elif name.endswith("mlp"):
            cfg.intermediate_size = mod.gate_proj.out_features
    cfg.use_cache = True
    return m.eval()


def tp_at_budget(model: nn.Module, budget: int, log) -> tuple[nn.Module, float, int]:
    """Bisect Torch-Pruning's ratio to the largest MACs at or under ``budget``."""
    lo, hi = 0.0, 0.95
    best = None
    for _ in range(10):
        mid = 0.5 * (lo + hi)
        try:
            m = tp_prune(model, mid)
        except Exception as err:  # too much pruning for the head constraints
            log(f"  TP ratio {mid:.3f}: {type(err).__name__}: {err}")
            hi = mid
            continue
        macs = llama_macs(m.config)
        if macs <= budget:
            best = (m, mid, macs)
            hi = mid
        else:
            lo = mid
    if best is None:
        raise RuntimeError("Torch-Pruning did not reach the budget")
    return best


# ------------------------------------------------------------------------------------------ runs

@dataclass
class Row:
    budget: str
    method: str
    policy: str
    criterion: str
    macs_ratio: float
    params: int
    ppl_pruned: float
    ppl_recovered: float
    widths: str
    seconds: float


def recover(student: nn.Module, teacher: nn.Module, batches: list, args, device: str) -> None:
    run_finetune(student, batches, teacher=teacher, epochs=1, optimizer="adamw", lr=args.recover_lr,
                 weight_decay=0.0, grad_clip=1.0, progress=False, seed=args.seed, device=device)


def widths(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "intermediate_size"):
        return (f"d={cfg.hidden_size} heads={cfg.num_attention_heads}/{cfg.num_key_value_heads} "
                f"mlp={cfg.intermediate_size}")
    return "per-layer"


def run(args) -> list[Row]:
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    torch.set_num_threads(args.threads)
    corpus = load_corpus()
    log(f"corpus: {len(corpus.train):,} training bytes ({corpus.files_train} files + docs), "
        f"{len(corpus.heldout):,} held-out bytes ({corpus.files_heldout} files)")
    model, record = train_model(args, corpus, log)  # on the CPU: capture and pruning run there
    teacher = copy.deepcopy(model).to(args.device).eval()  # evaluation and recovery run on --device
    windows = eval_windows(corpus.heldout, args.eval_windows)
    base_ppl = perplexity(teacher, windows)
    example = {"input_ids": windows[:1], "attention_mask": torch.ones_like(windows[:1])}
    base_macs = fxprune.count_macs(model, example)
    assert base_macs == llama_macs(model.config), (base_macs, llama_macs(model.config))
    log(f"model: {record['params'] / 1e6:.2f} M params, trained {record['steps']} steps "
        f"({record['seconds']:.0f}s), final train loss {record['final_loss']:.3f}; held-out perplexity "
        f"{base_ppl:.3f}; {base_macs / 1e6:.1f} M MACs at 1 x {SEQ}")
    calib = random_batches(corpus.train, 8, 8, seed=1000 + args.seed)
    rec_batches = random_batches(corpus.train, args.recover_steps, 8, seed=2000 + args.seed)
    rows: list[Row] = []
    budgets = [fxprune.budget.parse_mac_budget(b, base_macs) for b in args.budgets]
    labels = dict(zip(budgets, args.budgets))

    def finish(label, method, policy, crit, pruned, macs, t0):
        # a captured graph (per-layer widths) keeps capture-time device asserts for now: CPU
        on_cpu = isinstance(pruned, torch.fx.GraphModule) and str(args.device) != "cpu"
        device, ref = ("cpu", model) if on_cpu else (args.device, teacher)
        pruned = pruned.to(device)
        before = perplexity(pruned, windows)
        recover(pruned, ref, rec_batches, args, device)
        after = perplexity(pruned, windows)
        row = Row(label, method, policy, crit, macs / base_macs, sum(p.numel() for p in pruned.parameters()),
                  before, after, widths(pruned), time.perf_counter() - t0)
        rows.append(row)
        log(f"  {label:>4} {method:<9} {policy:<22} {crit:<14} MACs {row.macs_ratio:6.1%}  ppl {before:9.3f} -> "
            f"{after:7.3f}  [{row.widths}] {row.seconds:.0f}s")

    from fxprune._compile import compile_at_budget, open_session

    variants = [(p, c, None) for c in args.criteria for p in args.policies]
    if "activation" in args.criteria:
        variants += [("agentic", "activation", None), ("global", "activation", False)]
    sessions: dict[tuple[str, Any], Any] = {}
    for budget in budgets:
        for policy, crit, uniform in variants:
            t0 = time.perf_counter()
            name = policy + (" (per-layer)" if uniform is False else "")
            try:
                key = (crit, uniform)
                if key not in sessions:
                    sessions[key] = open_session(model, example, importance=crit, calibration_data=calib,
                                                 seed=args.seed, layer_uniform=uniform)
                session = sessions[key]
                res = compile_at_budget(model, session, budget, time.perf_counter(), tolerance=0.01, policy=policy,
                                        channel_multiple=8, min_keep_ratio=0.1, importance=crit, evaluate=None,
                                        calibration_data=calib, seed=args.seed, verify=True, policy_options=None)
                pruned = res.to_hf() if uniform is None else copy.deepcopy(res.model)
                finish(labels[budget], "fxprune", name, crit, pruned, res.macs, t0)
            except Exception as err:  # one failing variant must not lose the others' numbers
                log(f"  {labels[budget]} fxprune {name} {crit}: FAILED {type(err).__name__}: {err}")
        if not args.no_tp:
            t0 = time.perf_counter()
            try:
                pruned, ratio, macs = tp_at_budget(model, budget, log)
                assert fxprune.count_macs(pruned, example) == macs
                finish(labels[budget], "TP", f"local, ratio {ratio:.3f}", "magnitude (l2)", pruned, macs, t0)
            except Exception as err:
                log(f"  {labels[budget]} Torch-Pruning: FAILED {type(err).__name__}: {err}")
    print(f"\nLLaMA {record['params'] / 1e6:.1f} M params (byte-level, trained {record['steps']} steps on the "
          f"standard library), held-out perplexity {base_ppl:.3f}; recovery: {args.recover_steps} distillation "
          f"steps of 8 x {SEQ} bytes; torch {torch.__version__}, device {args.device}\n")
    print("| budget | method | policy | criterion | MACs | params | ppl pruned | ppl after recovery | widths |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.budget} | {r.method} | {r.policy} | {r.criterion} | {r.macs_ratio:.1%} | {r.params / 1e6:.2f} M | "
              f"{r.ppl_pruned:.3f} | {r.ppl_recovered:.3f} | {r.widths} |")
    for label in args.budgets:
        mine = [r for r in rows if r.budget == label and r.method == "fxprune"]
        tp_rows = [r for r in rows if r.budget == label and r.method == "TP"]
        if mine:
            best = min(mine, key=lambda r: r.ppl_recovered)
            text = f"{label}: best fxprune {best.policy} + {best.criterion}: {best.ppl_recovered:.3f}"
            if tp_rows:
                text += f"; Torch-Pruning {tp_rows[0].ppl_recovered:.3f}"
            print(text)
    if args.json:
        atomic_write(args.json, json.dumps({"base_ppl": base_ppl, "base_macs": base_macs, "train": record,
                                            "rows": [asdict(r) for r in rows]}, indent=2))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", nargs="+", default=["50%", "30%"])
    p.add_argument("--criteria", nargs="+", default=list(DEFAULT_CRITERIA), choices=CRITERIA)
    p.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES), choices=POLICIES)
    p.add_argument("--train-steps", type=int, default=None, help="training steps of 16 x 128 bytes (default 400)")
    p.add_argument("--train-lr", type=float, default=2e-3)
    p.add_argument("--recover-steps", type=int, default=None, help="distillation steps (default 40)")
    p.add_argument("--recover-lr", type=float, default=5e-4)
    p.add_argument("--eval-windows", type=int, default=None, help="held-out windows of 128 bytes (default 128)")
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "fxprune", "bench_llm"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="train, evaluate and recover on this device (pruning runs "
                                                    "on the CPU); e.g. cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    p.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke test")
    p.add_argument("--json", help="write every row to this file")
    args = p.parse_args(argv)
    q = args.quick
    args.train_steps = args.train_steps or (30 if q else 400)
    args.recover_steps = args.recover_steps or (4 if q else 40)
    args.eval_windows = args.eval_windows or (16 if q else 128)
    logging.getLogger("fxprune").setLevel(logging.ERROR)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
