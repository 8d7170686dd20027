"""Accuracy at equal MACs: fxprune's policies vs Torch-Pruning's global magnitude pruning (issue 6).

A small CNN (``fxprune.testing.digits``) is trained on scikit-learn's digits with a fixed
train / validation / test split. For every MAC budget:

* fxprune compiles the model with each variant (``uniform``, ``global`` with ``l1`` and with
  ``taylor`` calibrated on the *validation* split, ``isomorphic``, ``agentic`` with the offline
  analyst scoring candidates by validation accuracy, as is or after a one-epoch fine-tune);
* Torch-Pruning (``tp.pruner.BasePruner`` + ``GroupMagnitudeImportance``, classifier ignored):
  ``global_pruning=True`` as issue 6 asks, the same with ``max_pruning_ratio=0.9`` (fxprune's
  ``min_keep_ratio=0.1``), and local (uniform) pruning. Each prunes progressively in small steps
  until the MACs, counted with ``fxprune.count_macs`` like fxprune's, are at most the *smallest*
  MACs any fxprune variant achieved at that budget (Torch-Pruning never gets more MACs);
* every pruned model gets the same short recovery fine-tune (``fxprune.finetune``, the unpruned
  model as teacher, SGD + cosine), and test accuracy is measured before and after it.

The test split is only used for the reported numbers. With several seeds (``--seeds 0 1 2``) the
model, the fine-tune shuffling and the pruning seeds change; the data split stays fixed, and a
paired table gives every row's per-seed difference to ``uniform``. ``--diagnose`` separates
allocation from channel selection: the per-group keep counts of uniform / global / agentic /
Torch-Pruning are each rebuilt with l1, taylor and random channel choice.

    python tools/bench_accuracy.py                       # seed 0, budgets 30/50/70 %
    python tools/bench_accuracy.py --seeds 0 1 2 --json /tmp/acc.json
    python tools/bench_accuracy.py --diagnose --seeds 0 1 2 --budgets 30% 50%
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

import fxprune
# the function, not ``fxprune.finetune``: once the submodule fxprune.finetune is imported, the package
# attribute of that name is the module (see the report of issue 6)
from fxprune.finetune import finetune as run_finetune
from fxprune.testing.digits import DigitsData, evaluate_accuracy, load_digits_data, train_digits_cnn

# label -> (policy, importance, agentic quality signal); the order is the table's order
VARIANTS: dict[str, tuple[str, str, str | None]] = {
    "fxprune uniform (l1)": ("uniform", "l1", None),
    "fxprune global (l1)": ("global", "l1", None),
    "fxprune global (taylor/val)": ("global", "taylor", None),
    "fxprune isomorphic (l1)": ("isomorphic", "l1", None),
    "fxprune agentic (offline, eval=val acc)": ("agentic", "l1", "val"),
    "fxprune agentic (offline, eval=val acc after 1-ep FT)": ("agentic", "l1", "val_ft"),
}
# label -> BasePruner options; the first is the configuration issue 6 asks for
# the allocations --diagnose rebuilds with every channel criterion (plus Torch-Pruning's widths)
DIAGNOSED = ("fxprune uniform (l1)", "fxprune global (l1)", "fxprune agentic (offline, eval=val acc)")
TP_VARIANTS: dict[str, dict[str, Any]] = {
    "TP global magnitude": {"global_pruning": True},
    "TP global magnitude, max_pruning_ratio=0.9": {"global_pruning": True, "max_pruning_ratio": 0.9},
    "TP local (uniform) magnitude": {"global_pruning": False},
}


# ------------------------------------------------------------------------------------------ data

@dataclass
class Splits:
    """Fixed train / validation / test split of sklearn digits (tensors as in fxprune.testing.digits)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def train_data(self) -> DigitsData:
        """The training part in the form ``train_digits_cnn`` reads (its "test" is our validation)."""
        return DigitsData(self.x_train, self.y_train, self.x_val, self.y_val)


def make_splits(split_seed: int = 0, test_fraction: float = 0.3, val_fraction: float = 0.2) -> Splits:
    """Test = ``test_fraction`` of all samples; validation = ``val_fraction`` of all, from the rest."""
    d = load_digits_data(split_seed, test_fraction=test_fraction)
    n_all = len(d.x_train) + len(d.x_test)
    n_val = int(n_all * val_fraction)
    perm = torch.as_tensor(np.random.default_rng(split_seed + 1).permutation(len(d.x_train)))
    va, tr = perm[:n_val], perm[n_val:]
    return Splits(d.x_train[tr], d.y_train[tr], d.x_train[va], d.y_train[va], d.x_test, d.y_test)


# --------------------------------------------------------------------------------------- helpers

def widths(model: nn.Module) -> dict[str, int]:
    """Output width of every conv / linear layer, by module path (same names for fx and eager)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            out[name] = m.out_channels
        elif isinstance(m, nn.Linear):
            out[name] = m.out_features
    return out


def classifier(model: nn.Module) -> nn.Module:
    """The last ``nn.Linear`` (its output width is the number of classes: never pruned)."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise ValueError("no nn.Linear classifier found")
    return last


@dataclass
class Row:
    """One pruned model: how it was made, its MACs and its test accuracy before/after fine-tune."""

    seed: int
    budget: str
    label: str
    macs: int
    base_macs: int
    target_macs: int
    acc_before: float
    acc_after: float = float("nan")
    prune_seconds: float = 0.0
    widths: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.macs / self.base_macs


# ---------------------------------------------------------------------------------- fine-tuning

def recover(model: nn.Module, teacher: nn.Module, splits: Splits, *, epochs: int, lr: float,
            seed: int) -> nn.Module:
    """The one recovery recipe every pruned model gets: ``fxprune.finetune`` with KD from the original."""
    run_finetune(model, (splits.x_train, splits.y_train), teacher=teacher, epochs=epochs, lr=lr,
                 optimizer="sgd", batch_size=64, seed=seed, progress=False)
    return model.eval()


# ----------------------------------------------------------------------------------- fxprune side

def prune_fxprune(model: nn.Module, splits: Splits, budget: str, policy: str, importance: str, *,
                  quality: str | None = None, seed: int = 0, channel_multiple: int = 8,
                  agentic_options: dict[str, Any] | None = None, ft_lr: float = 0.01):
    """``fxprune.compile`` one variant. Returns ``(CompileResult, seconds)``.

    Data-driven criteria are calibrated on the validation split. The agentic policy gets the
    validation split as calibration data too and scores candidates with ``quality``: ``"val"`` =
    validation accuracy of the pruned model as is, ``"val_ft"`` = validation accuracy after one
    epoch of the recovery fine-tune. The test split is never seen here.
    """
    x = splits.x_train[:1]
    kwargs: dict[str, Any] = {}
    if importance in ("taylor", "snip", "grasp") or policy == "agentic":
        kwargs["calibration_data"] = [(splits.x_val, splits.y_val)]
    if policy == "agentic":
        if quality == "val_ft":
            def evaluate(m: nn.Module) -> float:
                recover(m, model, splits, epochs=1, lr=ft_lr, seed=seed)
                return evaluate_accuracy(m, splits.x_val, splits.y_val)
        else:
            def evaluate(m: nn.Module) -> float:
                return evaluate_accuracy(m, splits.x_val, splits.y_val)
        kwargs["evaluate"] = evaluate
        kwargs["policy_options"] = {"llm": "offline", **(agentic_options or {})}
    t = time.perf_counter()
    res = fxprune.compile(model, (x,), mac_budget=budget, policy=policy, importance=importance, seed=seed,
                          channel_multiple=channel_multiple, **kwargs)
    return res, time.perf_counter() - t


# ------------------------------------------------------------------------------ Torch-Pruning side

@dataclass
class TPResult:
    model: nn.Module
    macs: int  # fxprune.count_macs
    tp_ops: int  # Torch-Pruning's own counter (MACs plus element-wise ops)
    steps: int
    seconds: float  # pruning only (excludes the fxprune recounts)
    count_seconds: float  # the recounts


def prune_tp_progressive(model: nn.Module, example: torch.Tensor, target_macs: int, *,
                         iterative_steps: int = 200, p: int = 2, round_to: int | None = None,
                         global_pruning: bool = True,
                         max_pruning_ratio: float = 1.0,
                         count: Callable[[nn.Module, torch.Tensor], int] | None = None) -> TPResult:
    """Torch-Pruning's recipe for a MAC target (``reproduce/main.py`` ``progressive_pruning``).

    ``BasePruner(pruning_ratio=1.0, iterative_steps=N)`` with ``GroupMagnitudeImportance(p)`` and
    the classifier ignored; one ``step()`` removes another ``1/N`` of the channels (ranked across
    groups when ``global_pruning``), and the loop stops at the first step whose MACs are at most
    ``target_macs``. MACs are counted with ``count`` (default ``fxprune.count_macs``).
    """
    import torch_pruning as tp

    count = count or (lambda m, x: fxprune.count_macs(m, x))
    m = copy.deepcopy(model).eval()
    pruner = tp.pruner.BasePruner(
        m, example, importance=tp.importance.GroupMagnitudeImportance(p=p), global_pruning=global_pruning,
        pruning_ratio=1.0, iterative_steps=iterative_steps, ignored_layers=[classifier(m)], round_to=round_to,
        max_pruning_ratio=max_pruning_ratio,
    )
    t_prune = t_count = 0.0
    t = time.perf_counter()
    macs = count(m, example)
    t_count += time.perf_counter() - t
    steps = 0
    while macs > target_macs and steps < iterative_steps:
        t = time.perf_counter()
        pruner.step()
        t_prune += time.perf_counter() - t
        steps += 1
        t = time.perf_counter()
        macs = count(m, example)
        t_count += time.perf_counter() - t
    if macs > target_macs:
        raise RuntimeError(f"Torch-Pruning did not reach {target_macs:,} MACs in {steps} steps "
                           f"({macs:,} MACs left)")
    tp_ops, _ = tp.utils.count_ops_and_params(m, example)
    return TPResult(m.eval(), int(macs), int(tp_ops), steps, t_prune, t_count)


# ------------------------------------------------------------------------------------------- run

@dataclass
class Config:
    budgets: tuple[str, ...] = ("30%", "50%", "70%")
    variants: tuple[str, ...] = tuple(VARIANTS)
    tp_variants: tuple[str, ...] = tuple(TP_VARIANTS)
    train_epochs: int = 15
    width: int = 32
    ft_epochs: int = 3
    ft_lr: float = 0.01
    channel_multiple: int = 8
    tp_steps: int = 200
    tp_p: int = 2
    tp_round_to: int | None = None
    agentic_options: dict[str, Any] = field(default_factory=dict)


def agentic_summary(res) -> dict[str, Any]:
    atts = [a for a in res.report.attempts if a.get("attempt") != "summary"]
    best = [a for a in atts if a.get("best_so_far")]
    return {"attempts": len(atts), "scored": sum(1 for a in atts if a.get("quality") is not None),
            "best_attempt": f"#{best[-1]['attempt']} {best[-1]['analyst']}" if best else None,
            "best_val": best[-1]["quality"] if best else None}


def run_seed(seed: int, cfg: Config, splits: Splits | None = None,
             log: Callable[[str], None] = print) -> dict:
    """Train the model for ``seed`` and produce every row for every budget."""
    splits = splits or make_splits(0)
    torch.manual_seed(seed)
    t = time.perf_counter()
    model, _ = train_digits_cnn(splits.train_data(), epochs=cfg.train_epochs, width=cfg.width, seed=seed)
    model.eval()
    x = splits.x_train[:1]
    base = fxprune.count_macs(model, x)
    acc = evaluate_accuracy(model, splits.x_test, splits.y_test)
    base_row = Row(seed, "100%", "original (unpruned)", base, base, base, acc, acc, widths=widths(model),
                   extra={"val_acc": evaluate_accuracy(model, splits.x_val, splits.y_val),
                          "train_seconds": time.perf_counter() - t})
    log(f"seed {seed}: trained in {base_row.extra['train_seconds']:.1f}s, "
        f"test acc {base_row.acc_before:.4f}, val acc {base_row.extra['val_acc']:.4f}, {base:,} MACs")
    rows = [base_row]
    for budget in cfg.budgets:
        made: list[tuple[Row, nn.Module]] = []
        for label in cfg.variants:
            policy, importance, quality = VARIANTS[label]
            res, secs = prune_fxprune(model, splits, budget, policy, importance, quality=quality, seed=seed,
                                      channel_multiple=cfg.channel_multiple,
                                      agentic_options=cfg.agentic_options, ft_lr=cfg.ft_lr)
            extra: dict[str, Any] = {"in_band": res.report.in_band, "mac_error": res.report.mac_error,
                                     "criterion": res.report.criterion}
            if policy == "agentic":
                extra.update(agentic_summary(res))
            row = Row(seed, budget, label, res.macs, base, res.report.budget_macs,
                      evaluate_accuracy(res.model, splits.x_test, splits.y_test), prune_seconds=secs,
                      widths=widths(res.model), extra=extra)
            made.append((row, res.model))
        # Torch-Pruning gets at most the MACs of every fxprune row of this budget
        target = min(r.macs for r, _ in made) if made else int(base * float(budget.rstrip("%")) / 100)
        for label in cfg.tp_variants:
            tpr = prune_tp_progressive(model, x, target, iterative_steps=cfg.tp_steps, p=cfg.tp_p,
                                       round_to=cfg.tp_round_to, **TP_VARIANTS[label])
            row = Row(seed, budget, label, tpr.macs, base, target,
                      evaluate_accuracy(tpr.model, splits.x_test, splits.y_test), prune_seconds=tpr.seconds,
                      widths=widths(tpr.model),
                      extra={"tp_ops": tpr.tp_ops, "steps": tpr.steps, "count_seconds": tpr.count_seconds,
                             "mac_error_vs_target": (tpr.macs - target) / target})
            made.append((row, tpr.model))
        for row, pruned in made:
            recover(pruned, model, splits, epochs=cfg.ft_epochs, lr=cfg.ft_lr, seed=seed)
            row.acc_after = evaluate_accuracy(pruned, splits.x_test, splits.y_test)
            log(f"  {budget:>4} {row.label:<55} {row.macs:>10,} ({row.fraction:.4f})  "
                f"test {row.acc_before:.4f} -> {row.acc_after:.4f}  {row.prune_seconds:5.1f}s  "
                f"widths {row.widths}")
            rows.append(row)
    return {"seed": seed, "rows": rows}


# ---------------------------------------------------------------------------------------- tables

def format_seed_table(rows: list[Row]) -> str:
    lines = [f"| budget | policy / tool | MACs | fraction | test acc before FT | test acc after FT | "
             f"conv1/conv2+3/conv4/fc1 widths | notes |",
             "|---|---|---:|---:|---:|---:|---|---|"]
    for r in rows:
        w = r.widths
        wtxt = "/".join(str(w.get(k, "?")) for k in ("conv1", "conv2", "conv4", "fc1"))
        note = ""
        if "attempts" in r.extra:
            note = (f"{r.extra['attempts']} attempts ({r.extra['scored']} scored), "
                    f"best {r.extra['best_attempt']} (val {r.extra['best_val']:.3f}), {r.prune_seconds:.1f}s")
        elif "steps" in r.extra:
            note = (f"{r.extra['steps']} steps, "
                    f"MAC error vs target {100 * r.extra['mac_error_vs_target']:+.2f}%, "
                    f"TP counter {r.extra['tp_ops']:,}")
        elif "mac_error" in r.extra:
            note = f"{100 * r.extra['mac_error']:+.2f}% vs budget"
        lines.append(f"| {r.budget} | {r.label} | {r.macs:,} | {r.fraction:.4f} | {100 * r.acc_before:.2f} | "
                     f"{100 * r.acc_after:.2f} | {wtxt} | {note} |")
    return "\n".join(lines)


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def format_mean_table(all_rows: list[Row]) -> str:
    keys: list[tuple[str, str]] = []
    for r in all_rows:
        if (r.budget, r.label) not in keys:
            keys.append((r.budget, r.label))
    lines = ["| budget | policy / tool | MACs fraction (mean) | test acc before FT | test acc after FT "
             "| seeds |",
             "|---|---|---:|---:|---:|---:|"]
    for b, lab in keys:
        rs = [r for r in all_rows if (r.budget, r.label) == (b, lab)]
        lines.append(f"| {b} | {lab} | {statistics.mean(r.fraction for r in rs):.4f} | "
                     f"{_ms([r.acc_before for r in rs])} | {_ms([r.acc_after for r in rs])} | {len(rs)} |")
    return "\n".join(lines)


def format_paired_table(all_rows: list[Row], reference: str = "fxprune uniform (l1)") -> str:
    """Per-seed differences to ``reference`` (same model, same budget): removes the model-to-model spread."""
    by = {(r.seed, r.budget, r.label): r for r in all_rows}
    seeds = sorted({r.seed for r in all_rows})
    keys: list[tuple[str, str]] = []
    for r in all_rows:
        if r.budget != "100%" and r.label != reference and (r.budget, r.label) not in keys:
            keys.append((r.budget, r.label))
    lines = [f"| budget | policy / tool | Δ acc before FT vs {reference} (per seed) "
             f"| Δ acc after FT (per seed) |"
             f" wins/ties/losses after FT |", "|---|---|---|---|---|"]
    for b, lab in keys:
        pairs = [(by[(s, b, lab)], by[(s, b, reference)]) for s in seeds
                 if (s, b, lab) in by and (s, b, reference) in by]
        if not pairs:
            continue
        db = [100 * (x.acc_before - u.acc_before) for x, u in pairs]
        da = [100 * (x.acc_after - u.acc_after) for x, u in pairs]
        w = sum(d > 1e-9 for d in da), sum(abs(d) <= 1e-9 for d in da), sum(d < -1e-9 for d in da)
        lines.append(f"| {b} | {lab} | {statistics.mean(db):+.2f} ({', '.join(f'{d:+.1f}' for d in db)}) | "
                     f"{statistics.mean(da):+.2f} ({', '.join(f'{d:+.2f}' for d in da)}) | "
                     f"{w[0]}/{w[1]}/{w[2]} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ diagnosis

def diagnose(seed: int, cfg: Config, splits: Splits,
             log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Allocation x channel selection: each allocation (per-group keep counts) is rebuilt with each criterion.

    Allocations: the plans of fxprune's uniform, global (l1) and agentic (val) policies and the
    per-layer widths Torch-Pruning's global magnitude pruning reached (mapped onto fxprune's groups).
    Criteria pick *which* channels each group keeps: l1, taylor (validation) and random.
    """
    from fxprune._compile import open_session

    torch.manual_seed(seed)
    model, _ = train_digits_cnn(splits.train_data(), epochs=cfg.train_epochs, width=cfg.width, seed=seed)
    model.eval()
    x = splits.x_train[:1]
    session = open_session(model, (x,), importance="l1", calibration_data=[(splits.x_val, splits.y_val)],
                           seed=seed)
    groups = session.graph.groups
    out = []
    for budget in cfg.budgets:
        allocs: dict[str, np.ndarray] = {}
        macs_min = None
        for label, (policy, imp, quality) in VARIANTS.items():
            if label not in DIAGNOSED:
                continue
            res, _ = prune_fxprune(model, splits, budget, policy, imp, quality=quality, seed=seed,
                                   channel_multiple=cfg.channel_multiple)
            allocs[policy] = np.array([res.keep.get(g.id, g.n) for g in groups], dtype=np.int64)
            macs_min = res.macs if macs_min is None else min(macs_min, res.macs)
        tpr = prune_tp_progressive(model, x, macs_min, iterative_steps=cfg.tp_steps, p=cfg.tp_p)
        w = widths(tpr.model)
        allocs["TP global"] = np.array([w.get(g.name, g.n) for g in groups], dtype=np.int64)
        for alloc, keep in allocs.items():
            for crit in ("l1", "taylor", "random"):
                pruned, macs = session.materialize(keep, crit)
                before = evaluate_accuracy(pruned, splits.x_test, splits.y_test)
                recover(pruned, model, splits, epochs=cfg.ft_epochs, lr=cfg.ft_lr, seed=seed)
                after = evaluate_accuracy(pruned, splits.x_test, splits.y_test)
                rec = {"seed": seed, "budget": budget, "allocation": alloc, "criterion": crit,
                       "keep": "/".join(str(int(k)) for k in keep), "fraction": macs / session.base_macs,
                       "before": before, "after": after}
                log(f"  {budget:>4} {alloc:<10} {crit:<7} keep {rec['keep']:<16} {rec['fraction']:.4f}  "
                    f"test {before:.4f} -> {after:.4f}")
                out.append(rec)
    return out


def format_diagnosis(recs: list[dict[str, Any]]) -> str:
    lines = ["| budget | allocation | keep (seed 0) | MACs fraction | criterion | test acc before FT "
             "| test acc after FT | seeds |", "|---|---|---|---:|---|---:|---:|---:|"]
    keys: list[tuple[str, str, str]] = []
    for r in recs:
        if (r["budget"], r["allocation"], r["criterion"]) not in keys:
            keys.append((r["budget"], r["allocation"], r["criterion"]))
    for b, a, c in keys:
        rs = [r for r in recs if (r["budget"], r["allocation"], r["criterion"]) == (b, a, c)]
        frac = statistics.mean(r["fraction"] for r in rs)
        lines.append(f"| {b} | {a} | {rs[0]['keep']} | {frac:.4f} | {c} | "
                     f"{_ms([r['before'] for r in rs])} | {_ms([r['after'] for r in rs])} | {len(rs)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--budgets", nargs="+", default=["30%", "50%", "70%"])
    ap.add_argument("--ft-epochs", type=int, default=3)
    ap.add_argument("--ft-lr", type=float, default=0.01)
    ap.add_argument("--train-epochs", type=int, default=15)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--channel-multiple", type=int, default=8)
    ap.add_argument("--tp-steps", type=int, default=200, help="Torch-Pruning iterative_steps (1/N per step)")
    ap.add_argument("--tp-p", type=int, default=2, help="GroupMagnitudeImportance p (TP's default 2)")
    ap.add_argument("--tp-round-to", type=int, default=None)
    ap.add_argument("--no-tp", action="store_true")
    ap.add_argument("--no-ft-agentic", action="store_true", help="skip the (slow) FT-aware agentic variant")
    ap.add_argument("--diagnose", action="store_true",
                    help="instead of the table: cross allocations (uniform/global/agentic/TP widths) with "
                         "channel criteria (l1/taylor/random) to separate allocation from channel selection")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write every row here")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    cfg = Config(budgets=tuple(args.budgets), tp_variants=() if args.no_tp else tuple(TP_VARIANTS),
                 variants=tuple(v for v in VARIANTS
                                if not (args.no_ft_agentic and VARIANTS[v][2] == "val_ft")),
                 train_epochs=args.train_epochs, width=args.width,
                 ft_epochs=args.ft_epochs, ft_lr=args.ft_lr, channel_multiple=args.channel_multiple,
                 tp_steps=args.tp_steps, tp_p=args.tp_p, tp_round_to=args.tp_round_to)
    print(f"load average {os.getloadavg()}, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}")
    splits = make_splits(0)
    print(f"split: train {len(splits.x_train)}, validation {len(splits.x_val)}, test {len(splits.x_test)}; "
          f"fine-tune: fxprune.finetune, {cfg.ft_epochs} epochs, SGD lr {cfg.ft_lr}, cosine, "
          "KD from the original")
    t = time.perf_counter()
    if args.diagnose:
        drows = []
        for seed in args.seeds:
            drows += diagnose(seed, cfg, splits)
        print("\n" + format_diagnosis(drows))
        print(f"\ntotal {time.perf_counter() - t:.0f}s, load average {os.getloadavg()}")
        return 0
    all_rows: list[Row] = []
    for seed in args.seeds:
        out = run_seed(seed, cfg, splits)
        all_rows += out["rows"]
        print(f"\nseed {seed}\n" + format_seed_table(out["rows"]))
    if len(args.seeds) > 1:
        print(f"\nmean ± std over seeds {args.seeds}\n" + format_mean_table(all_rows))
        print(f"\npaired differences to uniform (percentage points; one test sample = "
              f"{100 / len(splits.x_test):.2f})\n" + format_paired_table(all_rows))
    print(f"\ntotal {time.perf_counter() - t:.0f}s, load average {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**asdict(r), "fraction": r.fraction} for r in all_rows], f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
