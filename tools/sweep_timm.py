"""Compile timm classification models to a MAC budget and check the result.

For each model (random weights, ``pretrained_cfg["input_size"]``), in its own subprocess:
  reference MACs (``torch.utils.flop_counter`` with autograd on, halved; timm's fused attention
  switched off for that run because the fused CPU kernel counts as 0 -- the ``fusedref`` column is
  the same counter with timm's default attention) -> compile at the budget ->
  band check -> count_macs(pruned) == result.macs -> forward at batch size 2 -> ONNX export with a
  dynamic batch -> onnxruntime parity. ``--oracle`` also runs the equivalence oracle (random plans
  over the exact groups) at the model's smallest convenient input size.
Prints one table row per model and a summary; ``--json`` writes all records.

    python tools/sweep_timm.py                              # the default list at 50%
    python tools/sweep_timm.py deit_tiny_patch16_224 --budget 0.62e9
    python tools/sweep_timm.py resnet50d swin_tiny_patch4_window7_224 --no-onnx --oracle
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def oracle(name: str, plans: int = 2) -> float:
    """Equivalence oracle on random plans over the exact groups (small input, non-constant weights)."""
    import numpy as np

    from fxprune.capture import capture
    from fxprune.passes.dependency_groups import DependencyGroupsAnalysis
    from fxprune.passes.shape_prop import ShapePropPass
    from fxprune.testing.equivalence import check_equivalence, random_plan
    from fxprune.testing.timm_cases import oracle_model

    model, inputs = oracle_model(name)
    cap = capture(model, inputs)
    ShapePropPass(cap.inputs)(cap.gm)
    dg = DependencyGroupsAnalysis().run(cap.gm)
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(plans):
        worst = max(worst, check_equivalence(cap.gm, dg, random_plan(dg, rng), cap.inputs, atol=1e-3))
    return worst


def run_one(name: str, budget: str, policy: str, onnx: bool, tolerance: float, with_oracle: bool) -> dict:
    import warnings

    warnings.filterwarnings("ignore")
    import timm
    import torch

    import fxprune
    from fxprune.testing.timm_cases import PUBLISHED_GMACS, reference_macs

    torch.manual_seed(0)
    rec: dict = {"model": name}
    model = timm.create_model(name, pretrained=False).eval()
    shape = tuple(model.pretrained_cfg["input_size"])
    x = torch.randn(1, *shape)
    rec["input"] = list(shape)
    rec["count_macs"] = fxprune.count_macs(model, x)
    rec["ref_macs"] = reference_macs(name, x)
    rec["ref_fused_macs"] = reference_macs(name, x, fused_attn=True)
    rec["ref_err_pct"] = round(100 * (rec["count_macs"] - rec["ref_macs"]) / rec["ref_macs"], 3)
    rec["published_gmacs"] = PUBLISHED_GMACS.get(name)
    t = time.perf_counter()
    res = fxprune.compile(model, (x,), mac_budget=budget, policy=policy, tolerance=tolerance)
    rec["seconds"] = round(time.perf_counter() - t, 2)
    r = res.report
    rec.update(base_macs=res.base_macs, macs=res.macs, budget=r.budget_macs, lower=r.lower_macs,
               err_pct=round(100 * r.mac_error, 3), in_band=r.in_band, groups=len(r.groups),
               head_groups=sum(1 for g in r.groups if g.kind == "heads"), frozen=len(r.frozen),
               frozen_reasons=[f"{f.name} ({f.size}): {'; '.join(f.reasons[:1])}" for f in r.frozen],
               params=res.params, base_params=res.base_params)
    rec["ref_ok"] = abs(rec["ref_err_pct"]) <= 0.5
    rec["recount_ok"] = fxprune.count_macs(res.model, x) == res.macs
    with torch.no_grad():
        y = res.model(torch.randn(2, *shape))
    rec["batch2_ok"] = tuple(y.shape)[0] == 2 and bool(torch.isfinite(y).all())
    if onnx:
        from fxprune.export import onnx_parity

        t = time.perf_counter()
        proto = res.export_onnx()
        par = onnx_parity(res.model, (x,), proto, batch_sizes=(1, 2))
        rec["onnx_ok"] = bool(par.ok)
        rec["onnx_max_abs"] = max(par.max_abs_err.values()) if par.max_abs_err else 0.0
        rec["onnx_seconds"] = round(time.perf_counter() - t, 2)
    if with_oracle:
        t = time.perf_counter()
        try:
            rec["oracle_max_abs"] = oracle(name)
            rec["oracle_ok"] = True
        except AssertionError as err:
            rec["oracle_ok"] = False
            rec["oracle_error"] = str(err)[:200]
        rec["oracle_seconds"] = round(time.perf_counter() - t, 2)
    return rec


CHECKS = ("ref_ok", "recount_ok", "batch2_ok", "onnx_ok", "oracle_ok")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*")
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--policy", default="global")
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--oracle", action="store_true", help="also run the equivalence oracle (random plans)")
    ap.add_argument("--json", help="write all records (JSON lines) to this file")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        try:
            rec = run_one(args.one, args.budget, args.policy, not args.no_onnx, args.tolerance, args.oracle)
        except Exception as err:  # report, never hide
            rec = {"model": args.one, "error": f"{type(err).__name__}: {str(err)[:400]}"}
        print("RESULT " + json.dumps(rec))
        return 0
    if not args.models:
        from fxprune.testing.timm_cases import MODELS

        args.models = list(MODELS)
    models = args.models
    out = open(args.json, "w") if args.json else None
    hdr = (f"{'model':30s} {'base GMAC':>9s} {'ref GMAC':>9s} {'ref %':>6s} {'fusedref':>8s} {'publ.':>6s} "
           f"{'achieved':>9s} {'err %':>7s} {'band':>4s} {'groups':>6s} {'heads':>5s} {'frozen':>6s} "
           f"{'time s':>7s} checks")
    print(hdr)
    print("-" * len(hdr))
    recs = []
    for name in models:
        cmd = [sys.executable, __file__, "--one", name, "--budget", args.budget, "--policy", args.policy,
               "--tolerance", str(args.tolerance)] + (["--no-onnx"] if args.no_onnx else []) + (
                   ["--oracle"] if args.oracle else [])
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
            err = (p.stderr or "no output")[-400:]
            rec = json.loads(line[-1][7:]) if line else {"model": name, "error": err}
        except subprocess.TimeoutExpired:
            rec = {"model": name, "error": f"timeout after {args.timeout}s"}
        recs.append(rec)
        if out:
            out.write(json.dumps(rec) + "\n")
            out.flush()
        if "error" in rec:
            print(f"{name:30s} ERROR {rec['error'][:200]}", flush=True)
            continue
        checks = [k for k in CHECKS if k in rec]
        failed = [k for k in checks if not rec[k]]
        pub = rec.get("published_gmacs")
        status = "all ok" if not failed else "FAILED " + ",".join(failed)
        print(f"{name:30s} {rec['base_macs'] / 1e9:9.4f} {rec['ref_macs'] / 1e9:9.4f} "
              f"{rec['ref_err_pct']:6.2f} {rec['ref_fused_macs'] / 1e9:8.4f} {pub if pub is not None else '-':>6} "
              f"{rec['macs'] / 1e9:9.4f} {rec['err_pct']:7.3f} {'ok' if rec['in_band'] else 'NO':>4s} "
              f"{rec['groups']:6d} {rec['head_groups']:5d} {rec['frozen']:6d} {rec['seconds']:7.1f} {status}",
              flush=True)
    ok = [r for r in recs if "error" not in r and r["in_band"] and all(r.get(k, True) for k in CHECKS)]
    errs = [abs(r["err_pct"]) for r in recs if "error" not in r]
    print(f"\nsummary: {len(ok)}/{len(recs)} models pass (count_macs == reference within 0.5%, band held, "
          f"recount equal, batch 2 runs{', ONNX parity' if not args.no_onnx else ''}"
          f"{', equivalence oracle' if args.oracle else ''}); "
          + (f"|MAC error| vs budget: mean {sum(errs) / len(errs):.3f}%, max {max(errs):.3f}%"
             if errs else ""))
    return 0 if len(ok) == len(recs) else 1


if __name__ == "__main__":
    sys.exit(main())
