"""Compile Hugging Face architecture families (small configs, random weights) and check the results.

Each family (``fxprune/testing/hf_cases.py``) runs in its own subprocess with a timeout: build the
model the way a new user would (default config apart from sizes, the default calling convention)
-> independent MAC count of the original -> ``fxprune.compile`` at the budget -> independent count
of the pruned model (``FlopCounterMode`` halved, math SDPA) inside the band -> the pruned model runs
at another batch size and, where the original accepts one, another sequence length / image size /
audio length -> ONNX export -> ONNX Runtime parity at batch 1 and 3 and at the other size.

Results are appended to a JSONL file (one record per family); a re-run skips the families already
in it (``--fresh`` starts over). A summary table ends the run.

    python tools/sweep_hf.py                              # every family, results in hf_sweep.jsonl
    python tools/sweep_hf.py bert swin --budget 40%       # some families
    python tools/sweep_hf.py --kind vision --no-onnx
    python tools/sweep_hf.py --list
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _why(rec: dict) -> str:
    """One short reason for a failed record."""
    if "known_limitation" in rec:
        return "known limitation: " + rec["known_limitation"][:150]
    if "error" in rec:
        return rec["error"][:160]
    out = []
    if rec.get("band_ok") is False:
        out.append(f"independent count {rec['ref_macs']:,} outside [{rec['lower_macs']:,}, {rec['budget_macs']:,}]"
                   f" (fxprune counted {rec['macs']:,})")
    if rec.get("batch_ok") is False:
        out.append("other batch size: output shapes differ")
    if rec.get("size_ok") is False:
        out.append("other input size: " + rec.get("size_error", "output shapes differ")[:120])
    if rec.get("onnx_ok") is False:
        out.append("ONNX parity" + (" at the other size" if rec.get("onnx_alt_ok") is False else ""))
    return "; ".join(out)


def _row(rec: dict) -> str:
    from fxprune.testing.hf_cases import passed

    name = rec["case"]
    if "macs" not in rec:
        return f"{name:16s} {rec.get('kind', ''):8s} {'FAIL':4s} {_why(rec)}"
    ok = passed(rec)
    pct = 100.0 * rec["ref_macs"] / rec["ref_base_macs"] if rec.get("ref_base_macs") and "ref_macs" in rec else float("nan")
    size = "ok" if rec.get("size_ok") else ("n/a" if "size_ok" not in rec else "FAIL")
    onnx = "ok" if rec.get("onnx_ok") else ("-" if "onnx_ok" not in rec else "FAIL")
    exact = "=" if rec.get("count_equal") else "!="
    return (f"{name:16s} {rec['kind']:8s} {'pass' if ok else 'FAIL':4s} {rec['base_macs'] / 1e6:9.3f} "
            f"{pct:7.2f}% {exact:>2s} {rec['groups']:4d} {rec['head_groups']:3d} {rec['pruned_groups']:4d} "
            f"{len(rec['frozen']):4d} {size:>4s} {onnx:>4s} {rec.get('seconds', 0):6.1f}  {'' if ok else _why(rec)}")


HEADER = (f"{'family':16s} {'kind':8s} {'':4s} {'base MMAC':>9s} {'ref %':>8s} {'':>2s} {'grp':>4s} {'hd':>3s} "
          f"{'prn':>4s} {'frz':>4s} {'size':>4s} {'onnx':>4s} {'time s':>6s}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*", help="family names (default: all)")
    ap.add_argument("--kind", help="only this kind: encoder, decoder, vision, audio, clip")
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--jsonl", default="hf_sweep.jsonl", help="results file (appended; resumable)")
    ap.add_argument("--fresh", action="store_true", help="ignore and overwrite earlier results")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per family")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:
        import warnings

        warnings.filterwarnings("ignore")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from fxprune.testing.hf_cases import run_case

        rec = run_case(args.one, budget=args.budget, onnx=not args.no_onnx, tolerance=args.tolerance)
        print("RESULT " + json.dumps(rec), flush=True)
        return 0

    from fxprune.testing.hf_cases import CASES, case_names, passed

    names = args.cases or case_names(args.kind)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"unknown families {unknown}; known: {', '.join(CASES)}", file=sys.stderr)
        return 2
    if args.list:
        for n in names:
            c = CASES[n]
            print(f"{n:16s} {c.kind:8s} {c.model}")
        return 0
    done: dict[str, dict] = {}
    if os.path.exists(args.jsonl) and not args.fresh:
        with open(args.jsonl) as f:
            for line in f:
                line = line.strip()
                if line:
                    rec = json.loads(line)
                    if rec.get("budget") == args.budget:
                        done[rec["case"]] = rec
    mode = "w" if args.fresh else "a"
    env = dict(os.environ, HF_HUB_OFFLINE="1", FXPRUNE_PROGRESS="0")
    print(HEADER)
    print("-" * len(HEADER))
    with open(args.jsonl, mode) as out:
        for name in names:
            if name in done:
                print(_row(done[name]) + "  (earlier run)", flush=True)
                continue
            cmd = [sys.executable, __file__, "--one", name, "--budget", args.budget,
                   "--tolerance", str(args.tolerance)] + (["--no-onnx"] if args.no_onnx else [])
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
                line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                tail = (p.stderr or "no output").strip().splitlines()
                rec = json.loads(line[-1][7:]) if line else {
                    "case": name, "kind": CASES[name].kind, "budget": args.budget,
                    "error": f"process died (rc {p.returncode}): {tail[-1][:300] if tail else ''}"}
            except subprocess.TimeoutExpired:
                rec = {"case": name, "kind": CASES[name].kind, "budget": args.budget,
                       "error": f"timeout after {args.timeout}s"}
            rec["passed"] = passed(rec)
            done[name] = rec
            out.write(json.dumps(rec) + "\n")
            out.flush()
            print(_row(rec), flush=True)
    recs = [done[n] for n in names]
    ok = [r for r in recs if passed(r)]
    print(f"\nsummary: {len(ok)}/{len(recs)} families pass at {args.budget} (independent count in the band, "
          f"other batch size{', other input size where the original accepts one'}"
          f"{', ONNX Runtime parity' if not args.no_onnx else ''})")
    kinds = sorted({r.get("kind", "") for r in recs})
    for k in kinds:
        rk = [r for r in recs if r.get("kind") == k]
        print(f"  {k:8s} {sum(passed(r) for r in rk)}/{len(rk)}")
    blocked = [r for r in recs if "known_limitation" in r]
    if blocked:
        print(f"  {len(blocked)} of the failures are known limitations tracked elsewhere: "
              + ", ".join(r["case"] for r in blocked))
    failed = [r for r in recs if not passed(r)]
    if failed:
        print("failed: " + "; ".join(f"{r['case']}: {_why(r)[:120]}" for r in failed))
    return 0 if len(ok) == len(recs) else 1


if __name__ == "__main__":
    sys.exit(main())
