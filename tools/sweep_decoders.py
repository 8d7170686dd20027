"""Every causal language model class of the installed transformers, tried as a new user would.

For each decoder-only ``model_type`` in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (encoders and
encoder-decoders excluded), in its own subprocess with a timeout: the default config with small
sizes (``--scale`` x 64 hidden, 2 layers, 4 experts where it has experts; random weights) -> one
forward (a config transformers itself cannot run is recorded as ``build`` and skipped) ->
``fxprune.compile(mac_budget="50%")`` -> ``result.to_hf()`` -> ``generate()`` -> ``save_pretrained``
/ ``from_pretrained`` -> the reloaded logits against the rebuilt model's and the rebuilt model's
against the pruned graph's. Results go to a JSONL file, a summary ends the run.

    python tools/sweep_decoders.py --jobs 2              # every type, results in decoders.jsonl
    python tools/sweep_decoders.py mixtral gpt_oss --scale 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

_NOT_DECODERS = {
    "bart", "bert", "bert-generation", "big_bird", "bigbird_pegasus", "blenderbot", "blenderbot-small", "camembert",
    "data2vec-text", "electra", "ernie", "marian", "mbart", "megatron-bert", "mvp", "pegasus", "plbart", "prophetnet",
    "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "trocr", "whisper", "xlm", "xlm-roberta",
    "xlm-roberta-xl", "xlnet", "xmod", "musicgen", "musicgen_melody", "moshi", "git", "got_ocr2", "fuyu", "emu3",
    "mllama", "phi4_multimodal", "reformer"}

_SMALL = dict(vocab_size=128, hidden_size=64, n_embd=64, d_model=64, intermediate_size=128, ffn_dim=128,
              n_inner=None, num_hidden_layers=2, n_layer=2, n_layers=2, num_layers=2, num_attention_heads=4,
              n_head=4, n_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128, n_positions=128,
              n_ctx=128, moe_intermediate_size=32, num_local_experts=4, num_experts=4, n_routed_experts=4,
              num_experts_per_tok=2, n_shared_experts=1, shared_expert_intermediate_size=64, pad_token_id=0,
              bos_token_id=1, eos_token_id=2, first_k_dense_replace=1, n_group=1, topk_group=1, kv_lora_rank=16,
              q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, rotary_dim=8,
              word_embed_proj_dim=64)
MARK = "@@record "  # a child's result line (models may print JSON of their own)
_SCALED = ("hidden_size", "n_embd", "d_model", "intermediate_size", "ffn_dim", "moe_intermediate_size",
           "shared_expert_intermediate_size", "word_embed_proj_dim")


def error_text(err: BaseException, n: int = 300) -> str:
    """``module.Class: message`` of an exception, the message cut at ``n`` characters."""
    return f"{type(err).__module__}.{type(err).__name__}: {str(err)[:n]}"


def error_class(text: str) -> str:
    """The class name in an :func:`error_text`."""
    return text.split(":")[0].rsplit(".", 1)[-1]


def _shrink(cfg, sizes: dict) -> None:
    """Sets the small sizes on one config (fields it has), its per-layer lists cut to two layers."""
    fields = cfg.to_dict()
    for k, v in sizes.items():
        try:  # (hasattr raises on Gemma 4's per-layer fields)
            if (k in fields or hasattr(cfg, k)) and not isinstance(getattr(cfg, k, None), (list, tuple)):
                setattr(cfg, k, v)  # (a per-stage list, Swin's heads, keeps its default)
        except Exception:  # noqa: BLE001 - a read-only, per-layer or validated field keeps its default
            pass
    for k in ("layer_types", "mlp_layer_types", "attn_layer_types"):
        lt = getattr(cfg, k, None)
        if isinstance(lt, (list, tuple)) and len(lt) > 2:
            setattr(cfg, k, list(lt[:2]))


def small_config(model_type: str, scale: int = 2, extra: dict | None = None, nested: bool = False):
    """The default config of ``model_type`` with small sizes (``nested``: its text, vision, audio,
    encoder and decoder configs too)."""
    import transformers as T

    sizes = {k: (v * scale if k in _SCALED else v) for k, v in _SMALL.items()}
    sizes.update(extra or {})
    cfg = T.AutoConfig.for_model(model_type)
    _shrink(cfg, sizes)
    for name in list(vars(cfg)) if nested else ():
        sub = getattr(cfg, name, None)
        if isinstance(sub, T.PretrainedConfig):
            _shrink(sub, sizes)
    return cfg


def _one(model_type: str, scale: int) -> dict:
    """Runs in the subprocess."""
    import tempfile
    import time
    import warnings

    warnings.filterwarnings("ignore")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    import transformers as T

    import fxprune

    rec: dict = {"type": model_type}
    try:
        cfg = small_config(model_type, scale)
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        torch.manual_seed(0)
        model = T.AutoModelForCausalLM.from_config(cfg).eval()
        ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(0))
        ex = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.no_grad():
            model(**ex)
    except Exception as err:  # noqa: BLE001 - transformers cannot build/run this small config
        rec["build"] = f"{type(err).__name__}: {str(err)[:200]}"
        return rec
    rec["params"] = sum(p.numel() for p in model.parameters())
    t = time.time()
    try:
        res = fxprune.compile(model, ex, mac_budget="50%")
    except Exception as err:  # noqa: BLE001
        rec["compile"] = error_text(err, 300)
        return rec
    rec["ratio"], rec["seconds"] = round(res.macs / res.base_macs, 4), round(time.time() - t, 1)
    rec["in_band"] = res.report.lower_macs <= res.macs <= res.report.budget_macs
    try:
        hf = res.to_hf()
        hf.generate(ids[:1, :8], max_new_tokens=6, do_sample=False)
    except Exception as err:  # noqa: BLE001
        rec["to_hf"] = error_text(err, 300)
        return rec
    rec["to_hf"] = "ok"
    try:
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            back = T.AutoModelForCausalLM.from_pretrained(d).eval()
            with torch.no_grad():
                a, b, c = hf(**ex).logits, back(**ex).logits, res.model(**ex).logits
        rec["roundtrip"], rec["vs_graph"] = float((a - b).abs().max()), float((a - c).abs().max())
    except Exception as err:  # noqa: BLE001 - e.g. the small config fails the class's own validation
        rec["save"] = error_text(err, 200)
    return rec


def _kind(rec: dict) -> str:
    if "timeout" in rec:
        return "timeout"
    if "build" in rec:
        return "small config does not run in transformers"
    if "compile" in rec:
        return "compile: " + error_class(rec["compile"])
    if not rec.get("in_band"):
        return "compiled OUTSIDE the band"
    if rec["to_hf"] != "ok":
        err = rec["to_hf"]
        if "needs a Hugging Face decoder" in err:
            return "compiled in band; to_hf refused: layers it cannot rebuild"
        if "planned per layer" in err:
            return "compiled in band; to_hf refused: planned per layer (budget/band)"
        return "compiled in band; to_hf FAILED: " + error_class(err)
    if "save" in rec:
        return "compiled, rebuilt, generates; save_pretrained fails (" + error_class(rec["save"]) + ")"
    if rec.get("roundtrip", 1) > 0 or rec.get("vs_graph", 1) > 1e-4:
        return "rebuilt but logits DIFFER"
    return "compiled in band, rebuilt, generates, save/load exact"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("types", nargs="*", help="model types (default: every decoder-only causal LM)")
    ap.add_argument("--scale", type=int, default=2, help="width multiplier of the small configs (default 2)")
    ap.add_argument("--out", default="decoders.jsonl")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--jobs", type=int, default=1, help="subprocesses at once")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(MARK + json.dumps(_one(args.one, args.scale)))
        return 0
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = args.types or sorted(t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if t not in _NOT_DECODERS)
    run_types(types, lambda t: [__file__, "--one", t, "--scale", str(args.scale)], _kind, args.out, args.jobs,
              args.timeout, "compile")
    return 0


def run_types(types: list[str], argv, kind, out_path: str, jobs: int, timeout: int, crash_field: str) -> list[dict]:
    """Each type in a subprocess (``python *argv(type)``, which prints its record after ``MARK``),
    ``jobs`` at once; records appended to ``out_path`` as they come, a summary by ``kind`` at the end."""

    def run(t: str) -> dict:
        try:
            out = subprocess.run([sys.executable, *argv(t)], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"type": t, "timeout": timeout}
        lines = [ln[len(MARK):] for ln in out.stdout.splitlines() if ln.startswith(MARK)]
        return json.loads(lines[-1]) if lines else {"type": t, crash_field: "crashed: " + out.stderr[-300:]}

    records = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for rec in pool.map(run, types):
            records.append(rec)
            print(f"{rec['type']:28s} {kind(rec)}", flush=True)
            with open(out_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
    counts = Counter(kind(r) for r in records)
    print(f"\n{len(records)} model types:")
    for k, n in counts.most_common():
        print(f"{n:4d}  {k}")
    return records


if __name__ == "__main__":
    raise SystemExit(main())
