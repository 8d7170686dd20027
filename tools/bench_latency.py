"""Does latency follow MACs, and do latency budgets hold? Measured on ONNX Runtime (CPU EP).

Part 1: compile each model to 50% of its MACs, then ``result.benchmark()`` (original and pruned
interleaved, batch 1): the measured speed-up divided by the MAC reduction (1.0: latency follows
MACs exactly; the issue's target for resnet50 is >= 0.85).

Part 2: ``fxprune.compile(..., latency_budget=P%)`` for P in 60 and 40: the budget (P% of the
original's median measured in the same interleaved run), the achieved measured median and the MACs.

Models have random weights (no download). One benchmark at a time in this process; the machine's
load average is printed with every row because a busy machine inflates everything.

    python tools/bench_latency.py                                  # the issue's tables
    python tools/bench_latency.py --threads 2 --policies global,uniform --json out.json
    python tools/bench_latency.py --skip-budgets resnet50
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings


def load(name: str):
    import torch
    from torchvision.models import get_model

    torch.manual_seed(0)
    return get_model(name, weights=None).eval(), torch.randn(1, 3, 224, 224)


def loadavg() -> str:
    try:
        return "/".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "?"


def follow_rows(models, policies, args) -> list[dict]:
    import fxprune
    from fxprune.latency import misaligned_groups

    rows = []
    print(f"\n## Latency vs MACs at {args.budget} MACs (batch 1, {args.threads} thread(s), opt {args.opt_level})\n")
    head = (f"| model | policy | GMAC orig -> pruned | MAC reduction | orig ms (p90) | pruned ms (p90) | speed-up "
            f"| speed-up / MAC red. | misaligned groups | loadavg |")
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    notes = []
    for name in models:
        model, x = load(name)
        for policy in policies:
            t = time.perf_counter()
            res = fxprune.compile(model, (x,), mac_budget=args.budget, policy=policy,
                                  channel_multiple=args.channel_multiple)
            cmp = res.benchmark(threads=args.threads, opt_level=args.opt_level, rounds=args.rounds,
                                runs_per_round=args.runs, warmup=args.warmup)
            lat = res.report.latency
            block = lat["nchwc_block"] or 8
            mis = misaligned_groups(res.report.groups, block)
            row = {"model": name, "policy": policy, "base_macs": res.base_macs, "macs": res.macs,
                   **{k: lat[k] for k in ("original_median_ms", "original_p90_ms", "pruned_median_ms",
                                          "pruned_p90_ms", "speedup", "mac_reduction",
                                          "speedup_per_mac_reduction", "threads", "opt_level",
                                          "loadavg_before", "loadavg_after", "nchwc_block")},
                   "misaligned": len(mis), "groups": len(res.report.groups), "warnings": lat["warnings"],
                   "bench_warnings": cmp.report.warnings, "seconds": round(time.perf_counter() - t, 1)}
            rows.append(row)
            print(f"| {name} | {policy} | {res.base_macs / 1e9:.3f} -> {res.macs / 1e9:.3f} | "
                  f"{row['mac_reduction']:.2f}x | {row['original_median_ms']:.2f} ({row['original_p90_ms']:.2f}) | "
                  f"{row['pruned_median_ms']:.2f} ({row['pruned_p90_ms']:.2f}) | {row['speedup']:.2f}x | "
                  f"**{row['speedup_per_mac_reduction']:.2f}** | {len(mis)}/{len(res.report.groups)} | "
                  f"{_load(row)} |", flush=True)
            notes += [f"- {name}/{policy}: {w}" for w in row["warnings"] + row["bench_warnings"]]
    print("\n".join(["", *notes]) if notes else "")
    return rows


def _load(row) -> str:
    a, b = row.get("loadavg_before"), row.get("loadavg_after")
    return f"{a[0]:.1f}->{b[0]:.1f}" if a and b else "?"


def budget_rows(models, fractions, args) -> list[dict]:
    import fxprune

    rows = []
    print(f"\n## Latency budgets (batch 1, {args.threads} thread(s), opt {args.opt_level}, policy {args.policy})\n")
    print("| model | budget | budget ms | achieved median ms (p90) | original ms (same run) | met | GMAC (fraction) "
          "| verifications | calibration | time s | loadavg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="fxprune_latency_cache_")
    for name in models:
        model, x = load(name)
        for fraction in fractions:
            spec = f"{round(fraction * 100)}%"
            t = time.perf_counter()
            opts = {"threads": args.threads, "opt_level": args.opt_level, "rounds": args.rounds,
                    "runs_per_round": args.runs, "warmup": args.warmup, "cache_dir": cache_dir}
            try:
                res = fxprune.compile(model, (x,), latency_budget=spec, policy=args.policy,
                                      channel_multiple=args.channel_multiple, latency_options=opts)
            except fxprune.BudgetUnreachableError as err:
                rows.append({"model": name, "budget": spec, "error": str(err)})
                print(f"| {name} | {spec} | unreachable: {str(err)[:200]} |" + " |" * 8, flush=True)
                continue
            lat = res.report.latency
            b = lat["budget"]
            row = {"model": name, "budget": spec, "budget_ms": b["budget_ms"], "achieved_ms": lat["pruned_median_ms"],
                   "achieved_p90_ms": lat["pruned_p90_ms"], "original_ms": lat["original_median_ms"],
                   "met": b["met"], "macs": res.macs, "base_macs": res.base_macs,
                   "verifications": b["measurements"], "cache": b["cache"],
                   "loadavg_before": lat["loadavg_before"], "loadavg_after": lat["loadavg_after"],
                   "attempts": [a for a in res.report.attempts if a.get("kind") == "latency"],
                   "warnings": lat["warnings"], "bench_warnings": lat["bench_warnings"],
                   "seconds": round(time.perf_counter() - t, 1)}
            rows.append(row)
            print(f"| {name} | {spec} | {row['budget_ms']:.2f} | {row['achieved_ms']:.2f} ({row['achieved_p90_ms']:.2f}) | "
                  f"{row['original_ms']:.2f} | {'yes' if row['met'] else 'NO'} | {res.macs / 1e9:.3f} "
                  f"({res.macs / res.base_macs:.2f}) | {row['verifications']} | {row['cache']} | {row['seconds']} | "
                  f"{_load(row)} |", flush=True)
            notes.append(f"- {name} {spec}: " + "; ".join(
                f"{a['stage']} {a['mac_fraction']:.2f} MACs -> {a['median_ms']:.2f} ms ({a['ratio']:.2f}x orig)"
                + (f" {'pass' if a['passed'] else 'FAIL'}" if "passed" in a else "") for a in row["attempts"]))
            notes += [f"- {name} {spec}: {w}" for w in row["warnings"] + row["bench_warnings"]]
    print("\n".join(["", "measurements (MAC fraction -> median):", *notes]) if notes else "")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,mobilenet_v2,convnext_tiny", help="part 1 models")
    ap.add_argument("--budget-models", default="resnet50,mobilenet_v2", help="part 2 models ('' to skip)")
    ap.add_argument("--budgets", default="0.6,0.4", help="part 2 latency budgets as fractions of the original")
    ap.add_argument("--budget", default="50%", help="part 1 MAC budget")
    ap.add_argument("--policies", default="global,uniform", help="part 1 policies")
    ap.add_argument("--policy", default="global", help="part 2 policy")
    ap.add_argument("--channel-multiple", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--opt-level", default="all")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--cache-dir", help="latency calibration cache (default: a fresh temporary directory)")
    ap.add_argument("--json", help="write every row to this JSON file")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import onnxruntime
    import torch

    torch.set_num_threads(max(1, args.threads))
    print(f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, {os.cpu_count()} logical CPUs, "
          f"loadavg at start {loadavg()}")
    out = {"follow": [], "budgets": []}
    if args.models:
        out["follow"] = follow_rows([m for m in args.models.split(",") if m], args.policies.split(","), args)
    if args.budget_models:
        out["budgets"] = budget_rows([m for m in args.budget_models.split(",") if m],
                                     [float(f) for f in args.budgets.split(",")], args)
    print(f"\nloadavg at end {loadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
