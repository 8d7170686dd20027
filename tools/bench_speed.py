"""Speed of fxprune's counter and compiler vs Torch-Pruning's progressive pruning (issue 3).

Three measurements on a torchvision model with random weights (ResNet-50 by default), one
torch thread unless ``--threads`` says otherwise, load average printed beside every timing:

1. ``fxprune.count_macs``: median of ``--repeats`` runs, with the breakdown capture (torch.fx
   graph) / shape propagation (one real forward) / counting (the analytical cost model);
2. ``fxprune.compile(model, x, mac_budget=budget)``: wall time from the call to the rewritten
   model, with ``result.report.timings``;
3. Torch-Pruning's recipe for a MAC target (``reproduce/main_imagenet.py``: ``BasePruner`` with
   ``GroupMagnitudeImportance``, ``pruning_ratio=1.0``, ``iterative_steps=100``, classifier
   ignored, ``pruner.step()`` then recount until at or under the target), local and global,
   stopping on Torch-Pruning's own counter (what its users run) and, for comparison, on
   ``fxprune.count_macs``.

Every result is measured with ``fxprune.count_macs``; the MAC error is ``achieved / target - 1``
with the target ``budget x fxprune's count of the original``. Torch-Pruning's own count is
printed too (it adds element-wise ops such as BN and ReLU to the MACs).

    python tools/bench_speed.py
    python tools/bench_speed.py --model resnet18 --budget 30% --repeats 3 --json /tmp/speed.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.nn as nn

import fxprune
from fxprune.capture import capture
from fxprune.cost_models.mac import MacCostModel
from fxprune.passes.shape_prop import ShapePropPass


def load() -> str:
    return "load %.2f %.2f %.2f" % os.getloadavg()


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ----------------------------------------------------------------------------------- count_macs

def time_count_macs(model: nn.Module, x: Any, repeats: int = 5) -> dict[str, Any]:
    """Median seconds of ``fxprune.count_macs`` and of its three stages (same steps as its code).

    The stages are timed in separate runs from the public call, so the public number carries no
    instrumentation overhead.
    """
    stages: dict[str, list[float]] = {"capture": [], "shape_prop": [], "count": [], "stages_total": []}
    public: list[float] = []
    macs = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        cap = capture(model, (x,), share_weights=True)
        t1 = time.perf_counter()
        ShapePropPass(cap.inputs)(cap.gm)
        t2 = time.perf_counter()
        total = MacCostModel().count(cap.gm).total
        t3 = time.perf_counter()
        for k, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
            stages[k].append(v)
        t = time.perf_counter()
        macs = fxprune.count_macs(model, x)
        public.append(time.perf_counter() - t)
        assert macs == total, (macs, total)
    return {"macs": macs, "seconds": _median(public), "runs": public,
            **{f"{k}_seconds": _median(v) for k, v in stages.items()}}


# -------------------------------------------------------------------------------------- compile

def time_compile(model: nn.Module, x: Any, budget: str, *, policy: str = "global",
                 **kwargs: Any) -> dict[str, Any]:
    """Wall time of one ``fxprune.compile`` and its report (MACs recounted with ``count_macs``)."""
    t = time.perf_counter()
    res = fxprune.compile(model, (x,), mac_budget=budget, policy=policy, **kwargs)
    wall = time.perf_counter() - t
    recount = fxprune.count_macs(res.model, x)
    target = res.report.budget_macs
    return {"tool": f"fxprune compile (policy {policy})", "seconds": wall,
            "timings": dict(res.report.timings),
            "base_macs": res.base_macs, "target_macs": target, "macs": recount, "reported_macs": res.macs,
            "mac_error": recount / target - 1, "in_band": res.report.in_band, "model": res.model}


# -------------------------------------------------------------------------------- Torch-Pruning

def _classifier(model: nn.Module) -> list[nn.Module]:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return last[-1:]


def tp_progressive(model: nn.Module, x: Any, fraction: float, *, global_pruning: bool = False,
                   iterative_steps: int = 100, counter: str = "tp", p: int = 2) -> dict[str, Any]:
    """Torch-Pruning's progressive loop to ``fraction`` of the original's MACs, timed.

    ``counter="tp"`` stops on ``tp.utils.count_ops_and_params`` (target: ``fraction`` of its
    count of the original), ``counter="fxprune"`` on ``fxprune.count_macs``. Times: ``build``
    (``BasePruner``: dependency graph and groups), ``steps`` (all ``pruner.step()``), ``count``
    (the recounts of the loop), ``seconds`` (everything, from the original model to the pruned one).
    """
    import torch_pruning as tp

    fx_count: Callable[[nn.Module], int] = lambda m: fxprune.count_macs(m, x)  # noqa: E731
    tp_count: Callable[[nn.Module], int] = lambda m: int(tp.utils.count_ops_and_params(m, x)[0])  # noqa: E731
    count = tp_count if counter == "tp" else fx_count
    fx_base = fx_count(model)
    t_all = time.perf_counter()
    m = copy.deepcopy(model).eval()
    t = time.perf_counter()
    pruner = tp.pruner.BasePruner(m, x, importance=tp.importance.GroupMagnitudeImportance(p=p),
                                  global_pruning=global_pruning, pruning_ratio=1.0,
                                  iterative_steps=iterative_steps,
                                  ignored_layers=_classifier(m))
    build = time.perf_counter() - t
    t = time.perf_counter()
    base = count(m)
    t_count = time.perf_counter() - t
    target = fraction * base
    t_steps, steps, current = 0.0, 0, base
    while current > target and steps < iterative_steps:
        t = time.perf_counter()
        pruner.step()
        t_steps += time.perf_counter() - t
        steps += 1
        t = time.perf_counter()
        current = count(m)
        t_count += time.perf_counter() - t
    seconds = time.perf_counter() - t_all
    fx_macs = fx_count(m)
    fx_target = fraction * fx_base
    tp_ops = tp_count(m)
    tp_base = tp_count(model)
    return {"tool": f"Torch-Pruning {'global' if global_pruning else 'local'} (stop on {counter} counter)",
            "seconds": seconds, "build_seconds": build, "steps_seconds": t_steps, "count_seconds": t_count,
            "steps": steps, "base_macs": fx_base, "target_macs": fx_target, "macs": fx_macs,
            "mac_error": fx_macs / fx_target - 1, "tp_ops": tp_ops, "tp_base_ops": tp_base,
            "tp_error": tp_ops / (fraction * tp_base) - 1, "reached": current <= target, "model": m}


# ----------------------------------------------------------------------------------------- main

def build_model(name: str) -> tuple[nn.Module, torch.Tensor]:
    from torchvision.models import get_model

    torch.manual_seed(0)
    model = get_model(name, weights=None).eval()
    return model, torch.randn(1, 3, 224, 224)


def parse_fraction(budget: str) -> float:
    return float(budget.rstrip("%")) / 100 if budget.endswith("%") else float(budget)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--repeats", type=int, default=7, help="runs of count_macs (median)")
    ap.add_argument("--compile-repeats", type=int, default=3, help="runs of fxprune.compile (median)")
    ap.add_argument("--policies", nargs="+", default=["global"],
                    help="fxprune policies to time (agentic runs with the offline analyst)")
    ap.add_argument("--tp-steps", type=int, default=100)
    ap.add_argument("--tp-modes", nargs="*", default=["local:tp", "global:tp", "local:fxprune"],
                    help="Torch-Pruning runs as scope:counter (scope local|global, counter tp|fxprune)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} torch thread(s), {os.cpu_count()} CPUs, {load()}")
    model, x = build_model(args.model)
    fraction = parse_fraction(args.budget)
    out: dict[str, Any] = {"model": args.model, "budget": args.budget, "threads": args.threads}

    fxprune.count_macs(model, x)  # warm-up (imports, first-call caches)
    cm = time_count_macs(model, x, args.repeats)
    out["count_macs"] = cm
    print(f"\n## fxprune.count_macs({args.model}) = {cm['macs']:,} MACs   [{load()}]")
    runs_txt = ", ".join(f"{r:.3f}" for r in cm["runs"])
    print(f"median of {args.repeats}: {cm['seconds']:.3f} s   (runs: {runs_txt})")
    print(f"breakdown (median): capture {cm['capture_seconds']:.3f} s, shape propagation "
          f"{cm['shape_prop_seconds']:.3f} s, counting {cm['count_seconds']:.3f} s "
          f"(sum {cm['stages_total_seconds']:.3f} s)")

    rows = []
    for policy in args.policies:
        opts = {"policy_options": {"llm": "offline"}} if policy == "agentic" else {}
        runs = [time_compile(model, x, args.budget, policy=policy, **opts)
                for _ in range(args.compile_repeats)]
        med = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
        med["runs"] = [r["seconds"] for r in runs]
        med["load"] = load()
        rows.append(med)
        print(f"\n## fxprune.compile(..., mac_budget={args.budget!r}, policy={policy!r})   [{med['load']}]")
        runs_txt = ", ".join(f"{r:.2f}" for r in med["runs"])
        print(f"median of {len(runs)}: {med['seconds']:.2f} s  (runs: {runs_txt})")
        print("report.timings: " + ", ".join(f"{k} {v:.3f}s" for k, v in med["timings"].items()))

    for mode in args.tp_modes:
        scope, counter = mode.split(":")
        r = tp_progressive(model, x, fraction, global_pruning=scope == "global",
                           iterative_steps=args.tp_steps, counter=counter)
        r["load"] = load()
        rows.append(r)
        print(f"\n## {r['tool']}   [{r['load']}]")
        print(f"{r['seconds']:.2f} s total: DG build {r['build_seconds']:.2f} s, {r['steps']} steps "
              f"{r['steps_seconds']:.2f} s, recounts {r['count_seconds']:.2f} s; "
              f"reached target: {r['reached']}")

    print(f"\n## {args.model} to {args.budget} of its MACs "
          f"(target {fraction * cm['macs']:,.0f} by fxprune.count_macs)")
    print("| tool | wall s | MACs (fxprune.count_macs) | MAC error vs target "
          "| TP counter: ops (error vs its own target) |")
    print("|---|---:|---:|---:|---|")
    for r in rows:
        tpc = f"{r['tp_ops']:,} ({100 * r['tp_error']:+.2f}%)" if "tp_ops" in r else "–"
        print(f"| {r['tool']} | {r['seconds']:.2f} | {r['macs']:,} | {100 * r['mac_error']:+.2f}% | {tpc} |")
    print(f"\n{load()}")
    if args.json:
        out["rows"] = [{k: v for k, v in r.items() if k != "model"} for r in rows]
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
