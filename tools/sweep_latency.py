"""Compile many models to a measured-latency budget on ONNX Runtime CPU and print whether each met it.

Each model (random weights, batch 1) runs in a process of its own:
``fxprune.compile(model, x, latency_budget=--budget, target="ort-cpu")`` with ``--threads`` intra-op
threads. Printed per model: the original's median ms, the verified ratio pruned / original (met
when at or under the budget; the compile aims 3% under it and accepts a model within 8% of it),
MACs kept, seconds, and the error for a model that failed. Layer tables are cached
(``~/.cache/fxprune/latency`` unless ``--cache-dir``), so a second run mostly measures whole models.

    python tools/sweep_latency.py                               # the default 20 torchvision/timm models
    python tools/sweep_latency.py torchvision:resnet18 timm:levit_128 --budget 60%
    python tools/sweep_latency.py --json sweep.json

A model is a spec of ``fxprune compile`` (``torchvision:NAME``, ``timm:NAME``, ``file.py:factory``),
built by the CLI's resolver at the input size of its default weights (``--input-shape`` for all).
Needs a quiet machine: the verification is a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODELS = (
    "torchvision:squeezenet1_1", "torchvision:shufflenet_v2_x1_0", "torchvision:mnasnet1_0",
    "torchvision:mobilenet_v3_large", "torchvision:densenet121", "torchvision:googlenet", "torchvision:convnext_tiny",
    "torchvision:efficientnet_v2_s", "torchvision:regnet_x_400mf", "torchvision:resnext50_32x4d", "torchvision:swin_t",
    "torchvision:vit_b_16", "torchvision:inception_v3", "timm:resnet18d", "timm:levit_128", "timm:mobilevit_xs",
    "timm:convnextv2_atto", "timm:ghostnet_100", "timm:efficientformer_l1", "timm:deit_tiny_patch16_224",
)


def child(spec: str, budget: str, threads: int, cache_dir: str | None, input_shape: str | None = None) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import fxprune
    from fxprune.models import parse_shape, resolve_model

    record: dict = {"model": spec}
    t0 = time.perf_counter()
    try:
        # the CLI's resolver: random weights, the input size of the model's default weights
        resolved = resolve_model(spec, input_shape=parse_shape(input_shape) if input_shape else None)
        result = fxprune.compile(resolved.model, resolved.example_inputs, latency_budget=budget, target="ort-cpu",
                                 latency_options={"threads": threads, "cache_dir": cache_dir})
        lat = result.report.latency
        record.update(ok=True, original_ms=lat["original_median_ms"],
                      ratio=lat["pruned_median_ms"] / lat["original_median_ms"],
                      macs_kept=result.macs / result.base_macs, measurements=lat["budget"]["measurements"],
                      prediction_error=lat["model"].get("median_abs_error"))
    except fxprune.FxpruneError as err:
        record.update(ok=False, error=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
    record["seconds"] = time.perf_counter() - t0
    return record


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", default=list(MODELS))
    p.add_argument("--budget", default="50%")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--input-shape", default=None, help="example input shape of every model, e.g. 1,3,160,160")
    p.add_argument("--timeout", type=int, default=900, help="seconds per model (default 900)")
    p.add_argument("--json", default=None, help="write the records to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RECORD " + json.dumps(child(args.child, args.budget, args.threads, args.cache_dir, args.input_shape)),
              flush=True)
        return 0
    records = []
    for spec in args.models:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", spec, "--budget", args.budget,
               "--threads", str(args.threads)] + (["--cache-dir", args.cache_dir] if args.cache_dir else []) + (
                   ["--input-shape", args.input_shape] if args.input_shape else [])
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RECORD ")]
            record = json.loads(lines[-1][7:]) if lines else {
                "model": spec, "ok": False, "crash": True,
                "error": (out.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        except subprocess.TimeoutExpired:
            record = {"model": spec, "ok": False, "error": f"timed out after {args.timeout} s"}
        records.append(record)
        print(f"[{spec}] " + ("ok" if record.get("ok") else record.get("error", "")), file=sys.stderr, flush=True)
    budget = float(args.budget.rstrip("%")) / 100 if args.budget.endswith("%") else None
    print(f"\n## latency_budget={args.budget!r} on ONNX Runtime CPU, {args.threads} thread(s), batch 1\n")
    print("| model | original ms | pruned / original | met | MACs kept | measurements | prediction error | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        if not r.get("ok"):
            print(f"| {r['model']} | | | **no**: {r.get('error', '')} | | | | |")
            continue
        met = "yes" if budget is None or r["ratio"] <= budget else "**no**"
        err = f"{100 * r['prediction_error']:.1f}%" if r.get("prediction_error") is not None else ""
        print(f"| {r['model']} | {r['original_ms']:.2f} | {r['ratio']:.3f} | {met} | {100 * r['macs_kept']:.1f}% | "
              f"{r['measurements']} | {err} | {r['seconds']:.0f} |")
    ok = [r for r in records if r.get("ok")]
    print(f"\n{len(ok)}/{len(records)} compiled" + (
        f"; met: {sum(r['ratio'] <= budget for r in ok)}; within 8% under the budget: "
        f"{sum(budget * 0.92 <= r['ratio'] <= budget for r in ok)}" if budget is not None else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
