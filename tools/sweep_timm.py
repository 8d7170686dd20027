"""Compile timm models to a MAC budget and check every result; up to every architecture timm has.

Each model runs in a process of its own (random weights, ``pretrained_cfg["input_size"]``), forked
from a server that has only imported torch, timm and fxprune (``--no-fork``: a fresh interpreter per
model), through ``fxprune.testing.timm_cases.check_case``:

  eligibility on the meta device (skipped over 100 M parameters or 30 GMACs) -> count_macs equals
  the independent count (torch.utils.flop_counter on fake tensors) and is exact -> compile at the
  budget -> the band holds by the independent count of the pruned model, which equals result.macs
  (a miss the report calls in band is a *silent miss*) -> the pruned model runs at batch size 2 ->
  and at another input size (+32 px) where the original accepts one -> ONNX export with a dynamic
  batch matches onnxruntime at batch sizes 1 and 2. ``--oracle`` also runs the equivalence oracle.

A case passes when every check does. Outcomes: pass, fail (by first failing stage: count,
compile, verify, batch, size, onnx), crash (fxprune raised something that is not an FxpruneError,
or the subprocess died), timeout, skipped (over the limits, or timm cannot build it).

    python tools/sweep_timm.py                                   # the default 11-model list at 50%
    python tools/sweep_timm.py deit_tiny_patch16_224 --budget 0.62e9
    python tools/sweep_timm.py resnet50d swin_tiny_patch4_window7_224 --no-onnx --oracle
    python tools/sweep_timm.py --all --results timm_all.jsonl --jobs 1 --timeout 900   # resumable
    python tools/sweep_timm.py --all --sample 80 --seed 1 --results sample1.jsonl
    python tools/sweep_timm.py --summary timm_all.jsonl          # the table of a results file
    python tools/sweep_timm.py --ci-sample 40 --seed 0 --small 64  # draw the CI sample (eligible models)
    python tools/sweep_timm.py --ci --results ci.jsonl           # run the CI sample at its CI configs

``--results FILE`` appends one JSON line per model and skips models already in it (re-run the same
command to resume; ``--fresh`` starts over). ``--json FILE`` writes this run's records (overwrites).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed

HERE = os.path.dirname(os.path.abspath(__file__))
STAGES = ("compile", "count", "verify", "batch", "size", "onnx", "oracle")


# ------------------------------------------------------------------------------ one model (child)

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


def run_one(name: str, budget: str, policy: str, onnx: bool, tolerance: float, with_oracle: bool,
            check_limits: bool, small: int | None, ci: bool = False) -> dict:
    import resource
    import warnings

    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    from fxprune import progress
    from fxprune.testing.timm_cases import check_case, eligibility

    progress.set_enabled(False)
    t = time.perf_counter()
    if check_limits:
        try:
            elig = eligibility(name)
        except Exception as err:
            return {"model": name, "status": "skipped", "stage": "create",
                    "reason": f"cannot be created: {type(err).__name__}: {str(err)[:300]}"}
        if not elig["eligible"]:
            return {"model": name, "status": "skipped", "stage": "limits", "reason": elig["reason"], **elig}
    if ci:  # exactly the CI sample's configuration of this model
        from fxprune.testing.timm_cases import CI_SAMPLE

        kwargs, shape = CI_SAMPLE[name]
        rec = check_case(name, budget=budget, policy=policy, tolerance=tolerance, onnx=onnx,
                         create_kwargs=kwargs, input_size=shape)
    else:
        rec = check_case(name, budget=budget, policy=policy, tolerance=tolerance, onnx=onnx, small=small)
    if check_limits:
        rec["eligibility"] = elig
    if with_oracle and rec["status"] != "skipped":
        t1 = time.perf_counter()
        try:
            rec["oracle_max_abs"] = oracle(name)
        except AssertionError as err:
            rec["failed"].append("oracle")
            rec.setdefault("errors", {})["oracle"] = str(err)[:300]
            if rec["status"] == "pass":
                rec.update(status="fail", stage="oracle")
        rec["oracle_seconds"] = round(time.perf_counter() - t1, 2)
    rec["wall_seconds"] = round(time.perf_counter() - t, 2)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    rec["cpu_seconds"] = round(ru.ru_utime + ru.ru_stime, 2)  # whole child process, all threads
    return rec


# ------------------------------------------------------------------------------ driver

def _child_cmd(name: str, args) -> list[str]:
    cmd = [sys.executable, __file__, "--one", name, "--budget", args.budget, "--policy", args.policy,
           "--tolerance", str(args.tolerance)]
    cmd += ["--no-onnx"] if args.no_onnx else []
    cmd += ["--oracle"] if args.oracle else []
    cmd += ["--no-limits"] if args.no_limits else []
    cmd += ["--small", str(args.small)] if args.small else []
    cmd += ["--ci"] if args.ci else []
    return cmd


def _one_record(name: str, args) -> dict:
    """The child's record of one model (``run_one``); a harness error is reported, never hidden."""
    try:
        return run_one(name, args.budget, args.policy, not args.no_onnx, args.tolerance, args.oracle,
                       not args.no_limits and not args.ci, args.small, args.ci)
    except Exception as err:
        return {"model": name, "status": "crash", "stage": "harness",
                "reason": f"{type(err).__name__}: {str(err)[:400]}"}


def _child_env(args) -> dict[str, str]:
    return {"FXPRUNE_PROGRESS": "0", "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}


#: imported once by the fork server, so each forked child starts with them loaded (~7 s a model)
_PRELOAD = ["torch", "timm", "onnx", "onnxruntime", "fxprune", "fxprune.testing.timm_cases"]
_FORK_CONTEXT = None


def _fork_context(args):
    """A ``forkserver`` multiprocessing context whose server has imported torch, timm and fxprune.
    Each model still runs in a process of its own, forked from that clean, freshly imported state
    (never from a process that has run a model), so no state passes from one model to the next."""
    global _FORK_CONTEXT
    if _FORK_CONTEXT is None:
        import multiprocessing

        os.environ.update(_child_env(args))  # the server (and every child) inherits it
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        _FORK_CONTEXT = ctx
    return _FORK_CONTEXT


def _forked_child(name: str, args, conn, log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import torch

    torch.set_num_threads(args.threads)
    conn.send(json.dumps(_one_record(name, args), default=str))
    conn.close()


def _run_forked(name: str, args) -> dict:
    import tempfile

    t = time.perf_counter()
    ctx = _fork_context(args)
    recv, send = ctx.Pipe(duplex=False)
    with tempfile.NamedTemporaryFile(prefix="sweep_timm_", suffix=".log", delete=False) as log:
        log_path = log.name
    try:
        proc = ctx.Process(target=_forked_child, args=(name, args, send, log_path), daemon=True)
        proc.start()
        send.close()  # the child holds the only write end: EOF when it dies
        if not recv.poll(args.timeout):
            proc.kill()
            proc.join()
            return {"model": name, "status": "timeout", "stage": "", "reason": f"timeout after {args.timeout}s",
                    "wall_seconds": args.timeout}
        try:
            return json.loads(recv.recv())
        except EOFError:  # died without a result (segfault, out of memory ...)
            proc.join()
            with open(log_path, errors="replace") as f:
                tail = f.read().strip()[-600:] or "no output"
            return {"model": name, "status": "crash", "stage": "process",
                    "reason": f"exit code {proc.exitcode}: {tail}", "wall_seconds": round(time.perf_counter() - t, 1)}
        finally:
            proc.join(30)
    finally:
        recv.close()
        os.unlink(log_path)


def _run_child(name: str, args) -> dict:
    if args.fork:
        return _run_forked(name, args)
    t = time.perf_counter()
    env = dict(os.environ, **_child_env(args))
    try:
        p = subprocess.run(_child_cmd(name, args), capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"model": name, "status": "timeout", "stage": "", "reason": f"timeout after {args.timeout}s",
                "wall_seconds": args.timeout}
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if line:
        return json.loads(line[-1][7:])
    tail = (p.stderr or p.stdout or "no output").strip()[-600:]
    return {"model": name, "status": "crash", "stage": "process", "reason": f"exit code {p.returncode}: {tail}",
            "wall_seconds": round(time.perf_counter() - t, 1)}


def _row(rec: dict) -> str:
    name = str(rec.get("model", "?"))[:38]
    st = rec.get("status") or "?"
    if st in ("skipped", "timeout") or "base_macs" not in rec:
        why = rec.get("reason") or "; ".join(f"{k}: {v}" for k, v in (rec.get("errors") or {}).items())
        return f"{name:38s} {st.upper():8s} {rec.get('stage', '')}: {why[:160]}"
    healed = len(rec.get("healed") or [])
    status = "ok" if st == "pass" else f"{st.upper()} {','.join(rec.get('failed', []))}"
    return (f"{name:38s} {rec['base_macs'] / 1e9:8.3f} {rec['macs'] / 1e9:8.3f} {rec['err_pct']:7.3f} "
            f"{rec.get('groups', 0):6d} {rec.get('frozen', 0):6d} {healed:6d} {rec.get('measured_nodes', 0):5d} "
            f"{rec.get('seconds', 0):7.1f}  {status}")


HEADER = (f"{'model':38s} {'GMACs':>8s} {'pruned':>8s} {'err %':>7s} {'groups':>6s} {'frozen':>6s} "
          f"{'healed':>6s} {'meas.':>5s} {'time s':>7s}  checks")


def summarize(recs: list[dict], *, onnx: bool = True) -> str:
    """The summary table: pass / fail by stage / crash / timeout / skipped, silent misses, size-only fails."""
    n = len(recs)
    by = Counter(r.get("status") for r in recs)
    ran = [r for r in recs if r.get("status") not in ("skipped",)]
    fail_stage = Counter(r.get("stage") for r in recs if r.get("status") == "fail")
    crash_stage = Counter(r.get("stage") for r in recs if r.get("status") == "crash")
    skipped = Counter(r.get("stage") for r in recs if r.get("status") == "skipped")
    silent = [r["model"] for r in recs if r.get("silent_miss")]
    only_size = [r["model"] for r in recs if r.get("only_size")]
    healed = [r["model"] for r in recs if r.get("healed")]
    measured = [r["model"] for r in recs if r.get("measured_nodes")]
    inexact = [r["model"] for r in recs if r.get("macs_exact") is False]
    errs = [abs(r["err_pct"]) for r in recs if "err_pct" in r]
    lines = [f"models: {n}; ran {len(ran)}; skipped {by.get('skipped', 0)} "
             f"(over the limits {skipped.get('limits', 0)}, cannot be created {skipped.get('create', 0)})"]
    pct = 100 * by.get("pass", 0) / len(ran) if ran else 0.0
    lines.append(f"pass {by.get('pass', 0)}/{len(ran)} ({pct:.1f}%)")
    lines.append("fail by stage: " + (", ".join(f"{s} {fail_stage[s]}" for s in STAGES if fail_stage.get(s))
                                        or "none"))
    lines.append(f"crashes: {by.get('crash', 0)}" + (f" ({', '.join(f'{s} {c}' for s, c in crash_stage.items())})"
                                                     if crash_stage else "") + f"; timeouts: {by.get('timeout', 0)}")
    lines.append(f"silent budget misses (reported in band, not by the independent count): {len(silent)}"
                 + (f" {silent[:10]}" if silent else ""))
    lines.append(f"fail only the other-input-size check: {len(only_size)}" + (f" {only_size[:10]}" if only_size else ""))
    lines.append(f"self-healed (groups frozen after a failed candidate): {len(healed)} model(s)"
                 + (f" {healed[:10]}" if healed else ""))
    lines.append(f"ops counted by measurement (no exact rule): {len(measured)} model(s); MAC count not exact: "
                 f"{len(inexact)}" + (f" {inexact[:10]}" if inexact else ""))
    if errs:
        lines.append(f"|MAC error| vs budget: mean {sum(errs) / len(errs):.3f}%, max {max(errs):.3f}%")
    return "\n".join(lines)


def _load(path: str) -> list[dict]:
    recs = []
    if path and os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        recs.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass
    return recs


def ci_sample(n: int, seed: int, small: int, *, timeout: int = 600) -> dict[str, list]:
    """``n`` eligible architectures drawn by ``seed`` from ``timm.list_models()`` (eligibility of each
    candidate checked on the meta device in a subprocess, in the draw order), each with its small
    check configuration ``[create kwargs, input shape]`` (``small_config``)."""
    import timm

    names = sorted(timm.list_models())
    random.Random(seed).shuffle(names)
    out: dict[str, list] = {}
    for name in names:
        code = ("import json,warnings;warnings.filterwarnings('ignore');"
                "from fxprune.testing.timm_cases import eligibility, small_config;"
                f"e = eligibility({name!r}); c = small_config({name!r}, {small}) if e['eligible'] else None;"
                "print('ELIG '+json.dumps([e, c]))")
        line = []
        for _ in range(3):  # a busy machine must not change the sample: retry what timed out
            try:
                p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                continue
            line = [ln for ln in p.stdout.splitlines() if ln.startswith("ELIG ")]
            break
        if not line:
            print(f"    {name}: eligibility could not be determined", file=sys.stderr, flush=True)
            continue
        elig, conf = json.loads(line[-1][5:])
        if elig["eligible"]:
            out[name] = [conf[0], list(conf[1])]
            print(f"{len(out):3d} {name} {out[name]}", file=sys.stderr, flush=True)
            if len(out) == n:
                break
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*")
    ap.add_argument("--all", action="store_true", help="every architecture in timm.list_models()")
    ap.add_argument("--sample", type=int, help="a random sample of this many models (of --all or the names given)")
    ap.add_argument("--seed", type=int, default=0, help="seed of --sample and --ci-sample")
    ap.add_argument("--jobs", type=int, default=1, help="models compiled in parallel (one subprocess each)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per subprocess (default 1)")
    ap.add_argument("--budget", default="50%")
    ap.add_argument("--policy", default="global")
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--no-onnx", action="store_true")
    ap.add_argument("--oracle", action="store_true", help="also run the equivalence oracle (random plans)")
    ap.add_argument("--no-limits", action="store_true", help="do not skip models over 100 M params / 30 GMACs")
    ap.add_argument("--small", type=int, help="check at about this input size where the model allows (as CI)")
    ap.add_argument("--results", help="JSONL results file: appended to, models already in it are skipped")
    ap.add_argument("--fresh", action="store_true", help="with --results: start the file over")
    ap.add_argument("--json", help="write this run's records (JSON lines) to this file")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per model (default 1800)")
    ap.add_argument("--summary", metavar="JSONL", help="print the table and summary of a results file and exit")
    ap.add_argument("--ci-sample", type=int, metavar="N", help="print N eligible models drawn by --seed and exit")
    ap.add_argument("--ci", action="store_true",
                    help="run the CI sample (fxprune.testing.timm_cases.CI_SAMPLE) at its CI configurations")
    ap.add_argument("--no-fork", dest="fork", action="store_false",
                    help="start every model in a fresh interpreter (default: fork each model's process from a "
                         "server that has imported torch, timm and fxprune once, which saves ~7 s a model)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:
        print("RESULT " + json.dumps(_one_record(args.one, args), default=str), flush=True)
        return 0
    if args.summary:
        recs = _load(args.summary)
        print(HEADER)
        for r in recs:
            print(_row(r))
        print()
        print(summarize(recs))
        return 0
    if args.ci_sample:
        sample = ci_sample(args.ci_sample, args.seed, args.small or 64)
        print("CI_SAMPLE = {")
        for name, (kw, shape) in sample.items():
            print(f"    {name!r}: ({kw!r}, {tuple(shape)!r}),")
        print("}")
        return 0

    if args.ci:
        from fxprune.testing.timm_cases import CI_SAMPLE

        models = list(args.models or CI_SAMPLE)
    elif args.all:
        import timm

        models = sorted(timm.list_models())
    elif args.models:
        models = list(args.models)
    else:
        from fxprune.testing.timm_cases import MODELS

        models = list(MODELS)
    if args.sample:
        models = sorted(random.Random(args.seed).sample(models, min(args.sample, len(models))))
    done: dict[str, dict] = {}
    if args.results:
        if args.fresh and os.path.exists(args.results):
            os.remove(args.results)
        done = {r["model"]: r for r in _load(args.results)}
    todo = [m for m in models if m not in done]
    print(f"{len(models)} model(s); {len(models) - len(todo)} already in {args.results}; running {len(todo)} "
          f"with {args.jobs} job(s)", flush=True)
    print(HEADER)
    print("-" * len(HEADER), flush=True)
    for m in models:
        if m in done:
            print(_row(done[m]), flush=True)
    out = open(args.results, "a") if args.results else None
    js = open(args.json, "w") if args.json else None
    recs = [done[m] for m in models if m in done]
    try:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [pool.submit(_run_child, name, args) for name in todo]
            for fut in as_completed(futures):
                rec = fut.result()
                recs.append(rec)
                for f in (out, js):
                    if f:
                        f.write(json.dumps(rec, default=str) + "\n")
                        f.flush()
                print(_row(rec), flush=True)
    finally:
        for f in (out, js):
            if f:
                f.close()
    print()
    print(summarize(recs, onnx=not args.no_onnx))
    ran = [r for r in recs if r.get("status") != "skipped"]
    return 0 if all(r.get("status") == "pass" for r in ran) else 1


if __name__ == "__main__":
    sys.exit(main())
