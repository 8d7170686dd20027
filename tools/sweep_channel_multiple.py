"""Which ``channel_multiple`` is fastest? Measure it instead of guessing.

For each model: compile to the MAC budget once per channel multiple, export every pruned model and
the original to ONNX, and time them all in **one** interleaved ONNX Runtime benchmark
(``fxprune.bench.benchmark``: the model order rotates every round, so drift hits all equally).
Prints, per multiple, the achieved MACs, the median/p90 latency, the speed-up over the original,
speed-up / MAC reduction, and how many pruned groups keep a channel count off the NCHWc block of
this CPU (16 with AVX-512, 8 with AVX2) or off the multiple asked for (the solver may fall back to
single-channel steps to land in the MAC band, and says so).

    python tools/sweep_channel_multiple.py                      # resnet50, mobilenet_v2 at 50%
    python tools/sweep_channel_multiple.py --models resnet18 --multiples 1,8,16 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings


def sweep(name: str, multiples: list[int], args) -> list[dict]:
    import torch
    from torchvision.models import get_model

    import fxprune
    from fxprune.bench import BenchConfig, benchmark
    from fxprune.export import export_onnx
    from fxprune.latency import misaligned_groups, nchwc_block

    torch.manual_seed(0)
    model, x = get_model(name, weights=None).eval(), torch.randn(1, 3, 224, 224)
    block = nchwc_block() or 8
    protos, labels, results = [], ["original"], {}
    t = time.perf_counter()
    for m in multiples:
        res = fxprune.compile(model, (x,), mac_budget=args.budget, policy=args.policy, channel_multiple=m,
                              tolerance=args.tolerance)
        if not protos:
            protos.append(export_onnx(res.original, (x,)))
        protos.append(export_onnx(res.model, (x,)))
        labels.append(f"multiple={m}")
        results[m] = res
    build_s = time.perf_counter() - t
    config = BenchConfig(threads=args.threads, opt_level=args.opt_level, warmup=args.warmup, rounds=args.rounds,
                         runs_per_round=args.runs)
    report = benchmark(protos, config, labels=labels)
    orig = report.result("original")
    rows = []
    for m in multiples:
        res, r = results[m], report.result(f"multiple={m}")
        speedup = orig.median_ms / r.median_ms
        reduction = res.base_macs / res.macs
        rows.append({
            "model": name, "multiple": m, "base_macs": res.base_macs, "macs": res.macs,
            "original_median_ms": orig.median_ms, "median_ms": r.median_ms, "p90_ms": r.p90_ms,
            "min_ms": r.stats.min_ms, "max_ms": r.stats.max_ms, "speedup": speedup,
            "speedup_per_mac_reduction": speedup / reduction,
            "off_block": len(misaligned_groups(res.report.groups, block)),
            "off_multiple": len(misaligned_groups(res.report.groups, m)) if m > 1 else 0,
            "groups": len(res.report.groups), "solver_notes": res.report.solver_notes,
        })
    env = report.environment
    print(f"\n## {name} at {args.budget} MACs, policy {args.policy} — batch 1, {env['threads']} thread(s), opt "
          f"{env['opt_level']}, NCHWc block {block}, loadavg {env['loadavg_before'][0]:.1f} -> "
          f"{env['loadavg_after'][0]:.1f} (build+export {build_s:.0f}s)\n")
    print("| channel_multiple | GMAC (fraction) | median ms | p90 ms | min–max ms | speed-up | speed-up / MAC red. "
          "| groups off block | groups off multiple |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| original | {rows[0]['base_macs'] / 1e9:.3f} (1.00) | {orig.median_ms:.2f} | "
          f"{orig.p90_ms:.2f} | {orig.stats.min_ms:.2f}–{orig.stats.max_ms:.2f} | 1.00x | | | |")
    best = min(rows, key=lambda row: row["median_ms"])
    for row in rows:
        mark = "**" if row is best else ""
        print(f"| {row['multiple']} | {row['macs'] / 1e9:.3f} ({row['macs'] / row['base_macs']:.3f}) | "
              f"{mark}{row['median_ms']:.2f}{mark} | {row['p90_ms']:.2f} | {row['min_ms']:.2f}–{row['max_ms']:.2f} | "
              f"{row['speedup']:.2f}x | {row['speedup_per_mac_reduction']:.2f} | {row['off_block']}/{row['groups']} | "
              f"{row['off_multiple']}/{row['groups']} |", flush=True)
    for row in rows:
        for note in row["solver_notes"]:
            if "single-unit" in note:
                print(f"- multiple={row['multiple']}: {note}")
    for w in report.warnings:
        print(f"- warning: {w}")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50,mobilenet_v2")
    ap.add_argument("--multiples", default="1,4,8,16,32")
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--policy", default="global")
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--opt-level", default="all")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--json", help="write every row to this JSON file")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(max(1, args.threads))
    print(f"loadavg at start {'/'.join(f'{v:.1f}' for v in os.getloadavg())}")
    rows = []
    for name in [m for m in args.models.split(",") if m]:
        rows += sweep(name, [int(m) for m in args.multiples.split(",")], args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
