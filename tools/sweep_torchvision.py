"""Compile every torchvision classification model to a MAC budget and check the result.

For each model (random weights, default resolution), in its own subprocess:
  compile at the budget -> band check -> count_macs(pruned) == result.macs -> forward at a batch
  size different from the example's -> ONNX export with a dynamic batch -> onnxruntime parity.
Prints one table row per model and a summary; ``--json`` writes all records.

    python tools/sweep_torchvision.py                 # all 80 models at 50%
    python tools/sweep_torchvision.py resnet50 vit_b_16 --budget 30% --no-onnx
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def run_one(name: str, budget: str, policy: str, onnx: bool, tolerance: float) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torchvision
    from torchvision.models import get_model, get_model_weights

    import fxprune
    from fxprune.models import torchvision_model

    torch.manual_seed(0)
    rec: dict = {"model": name}
    weights = get_model_weights(name).DEFAULT
    size = getattr(weights.transforms(), "crop_size", [224])[0]
    model, _ = torchvision_model(name)
    x = torch.randn(1, 3, size, size)
    t = time.perf_counter()
    res = fxprune.compile(model, (x,), mac_budget=budget, policy=policy, tolerance=tolerance)
    rec["seconds"] = round(time.perf_counter() - t, 2)
    r = res.report
    rec.update(base_macs=res.base_macs, macs=res.macs, budget=r.budget_macs, lower=r.lower_macs,
               err_pct=round(100 * r.mac_error, 3), in_band=r.in_band, groups=len(r.groups),
               frozen=len(r.frozen), params=res.params, base_params=res.base_params,
               oracle_gmacs=weights.meta.get("_ops"))
    rec["recount_ok"] = fxprune.count_macs(res.model, x) == res.macs
    with torch.no_grad():
        y = res.model(torch.randn(2, 3, size, size))
    rec["batch2_ok"] = tuple(y.shape)[0] == 2 and bool(torch.isfinite(y).all())
    if onnx:
        from fxprune.export import onnx_parity

        t = time.perf_counter()
        proto = res.export_onnx()
        par = onnx_parity(res.model, (x,), proto, batch_sizes=(1, 2))
        rec["onnx_ok"] = bool(par.ok)
        rec["onnx_max_abs"] = float(par.max_abs_error) if hasattr(par, "max_abs_error") else None
        rec["onnx_seconds"] = round(time.perf_counter() - t, 2)
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*")
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--policy", default="global")
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--json", help="write all records (JSON lines) to this file")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        try:
            rec = run_one(args.one, args.budget, args.policy, not args.no_onnx, args.tolerance)
        except Exception as err:  # report, never hide
            rec = {"model": args.one, "error": f"{type(err).__name__}: {str(err)[:400]}"}
        print("RESULT " + json.dumps(rec))
        return 0
    if not args.models:
        import torchvision

        args.models = torchvision.models.list_models(module=torchvision.models)
    out = open(args.json, "w") if args.json else None
    hdr = f"{'model':22s} {'base GMAC':>9s} {'achieved':>9s} {'err %':>7s} {'band':>4s} {'groups':>6s} {'frozen':>6s} {'time s':>7s} checks"
    print(hdr)
    print("-" * len(hdr))
    recs = []
    for name in args.models:
        cmd = [sys.executable, __file__, "--one", name, "--budget", args.budget, "--policy", args.policy,
               "--tolerance", str(args.tolerance)] + (["--no-onnx"] if args.no_onnx else [])
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            rec = json.loads(line[-1][7:]) if line else {"model": name, "error": (p.stderr or "no output")[-400:]}
        except subprocess.TimeoutExpired:
            rec = {"model": name, "error": f"timeout after {args.timeout}s"}
        recs.append(rec)
        if out:
            out.write(json.dumps(rec) + "\n")
            out.flush()
        if "error" in rec:
            print(f"{name:22s} ERROR {rec['error'][:200]}", flush=True)
            continue
        checks = [k for k in ("recount_ok", "batch2_ok", "onnx_ok") if k in rec]
        failed = [k for k in checks if not rec[k]]
        print(f"{name:22s} {rec['base_macs'] / 1e9:9.3f} {rec['macs'] / 1e9:9.3f} {rec['err_pct']:7.3f} "
              f"{'ok' if rec['in_band'] else 'NO':>4s} {rec['groups']:6d} {rec['frozen']:6d} {rec['seconds']:7.1f} "
              f"{'all ok' if not failed else 'FAILED ' + ','.join(failed)}", flush=True)
    ok = [r for r in recs if "error" not in r and r["in_band"] and all(r.get(k, True) for k in ("recount_ok", "batch2_ok", "onnx_ok"))]
    errs = [abs(r["err_pct"]) for r in recs if "error" not in r]
    print(f"\nsummary: {len(ok)}/{len(recs)} models pass (band held, recount equal, batch 2 runs"
          f"{', ONNX parity' if not args.no_onnx else ''}); "
          + (f"|MAC error| vs budget: mean {sum(errs) / len(errs):.3f}%, max {max(errs):.3f}%" if errs else ""))
    return 0 if len(ok) == len(recs) else 1


if __name__ == "__main__":
    sys.exit(main())
