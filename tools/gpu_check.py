"""GPU check: MAC budget vs latency budget on PyTorch CUDA (fp16, channels_last, CUDA graphs).

For resnet50, convnext_tiny, vit_b_16, mobilenet_v2 and efficientnet_b0 (torchvision, random
weights, 224 px), at batch 1 and 256:

* ``captured``: the captured, unpruned model (split attention projections re-fused) against the
  original torchvision model: it must not be slower;
* ``mac 50%``: ``fxprune.compile(m, x, mac_budget="50%")``;
* ``latency 50%``: ``fxprune.compile(m, x, latency_budget="50%", target="torch-cuda", dtype="fp16",
  batch_size=B)`` (per-layer tables measured on this GPU, verified on the whole model).

Every pruned model is timed interleaved with the *original torchvision model* (same dtype, memory
format and CUDA graphs) and one table is printed: original ms, pruned ms, speed-up, MACs kept,
plus the latency model's prediction error. A failing row prints its error and the run goes on; a
time limit skips what is left (the table is still written). The table goes to stdout and to
``OUTDIR/gpu_check.md`` (and ``gpu_check.json``). Never needed by the tests or CI.

    python tools/gpu_check.py OUTDIR                          # the GPU run (about 4-5 minutes on one H200)
    python tools/gpu_check.py OUTDIR --dry-run                # CPU, 64 px, batch 1 and 2, two models
    python tools/gpu_check.py OUTDIR --models vit_b_16 --batches 1

Install on the GPU machine over its own torch: ``pip install --no-deps --no-build-isolation .``
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
import warnings

MODELS = ("resnet50", "convnext_tiny", "vit_b_16", "mobilenet_v2", "efficientnet_b0")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("outdir", help="directory for gpu_check.md / gpu_check.json (created if missing)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None, help="default fp16 on cuda, fp32 on cpu")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batches", default="256,1", help="batch sizes, in the order run (default 256,1)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--budget", default="50%", help="both the MAC and the latency budget")
    p.add_argument("--max-points", type=int, default=6, help="candidate widths timed per group")
    p.add_argument("--time-limit", type=float, default=270.0,
                   help="seconds; rows not started by then are skipped (the table is still written)")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--cache-dir", default=None, help="latency table cache (default OUTDIR/cache)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, 32 px, batches 2,1, resnet18 and vit_b_16, minimal timing: exercises every step")
    args = p.parse_args(argv)
    if args.dry_run:
        args.device = "cpu"
        args.image_size = 32 if args.image_size == 224 else args.image_size
        args.batches = "2,1" if args.batches == "256,1" else args.batches
        args.models = "resnet18,vit_b_16" if args.models == ",".join(MODELS) else args.models
        args.max_points = min(args.max_points, 3)
        args.rounds, args.runs = 1, 2
        args.time_limit = max(args.time_limit, 3600.0)
    args.dtype = args.dtype or ("fp16" if args.device == "cuda" else "fp32")
    return args


def load(name, size):
    import torch
    from torchvision.models import get_model

    torch.manual_seed(0)
    kw = {"image_size": size} if name.startswith("vit") else {}
    return get_model(name, weights=None, **kw).eval(), torch.randn(1, 3, size, size)


def timer(args, batch, x):
    from fxprune.runtimes import TorchRuntime

    return TorchRuntime(args.device, dtype=args.dtype, batch=batch, example_inputs=(x,),
                        cuda_graphs=not args.no_cuda_graphs, channels_last=True, warmup=3,
                        rounds=args.rounds, runs_per_round=args.runs)


def pair(args, batch, x, original, pruned):
    """Median ms of the original and the pruned model, interleaved."""
    import statistics

    rt = timer(args, batch, x)
    times = rt.time_models([original, pruned], ["original", "pruned"])
    med = [statistics.median([v for r in per for v in r]) for per in times]
    return med[0], med[1], rt.clock.warnings


def row_text(r):
    if r.get("error"):
        return (f"| {r['model']} | {r['batch']} | {r['kind']} | – | – | – | – | {r['error']} |")
    kept = f"{r['macs_kept']:.1%}" if r.get("macs_kept") is not None else "–"
    return (f"| {r['model']} | {r['batch']} | {r['kind']} | {r['original_ms']:.3f} | {r['pruned_ms']:.3f} | "
            f"**{r['speedup']:.2f}x** | {kept} | {r.get('note', '')} |")


def main(argv=None):
    args = parse(argv)
    os.makedirs(args.outdir, exist_ok=True)
    warnings.filterwarnings("ignore")
    import torch

    import fxprune
    from fxprune import progress

    progress.set_enabled(False)
    cache_dir = args.cache_dir or os.path.join(args.outdir, "cache")
    t_start = time.perf_counter()
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    head = (f"# fxprune gpu_check — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
            f"device: {device_name}; torch {torch.__version__}"
            f"{' (CUDA ' + str(torch.version.cuda) + ')' if args.device == 'cuda' else ''}; "
            f"{args.dtype}, channels_last, "
            f"{'CUDA graphs' if args.device == 'cuda' and not args.no_cuda_graphs else 'eager'}; "
            f"{args.image_size} px; budgets {args.budget}; random weights; "
            f"timing {args.rounds} interleaved rounds x {args.runs} runs, median\n")
    print(head, flush=True)
    table = ["| model | batch | plan | original ms | pruned ms | speed-up | MACs kept | notes |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(table), flush=True)
    rows = []
    batches = [int(b) for b in args.batches.split(",") if b.strip()]

    def emit(r):
        rows.append(r)
        print(row_text(r), flush=True)

    def out_of_time():
        return time.perf_counter() - t_start > args.time_limit

    def latency_plan(name, batch):
        model, x, _ = loaded[name]
        res = fxprune.compile(
            model, (x,), latency_budget=args.budget, target=f"torch-{args.device}", dtype=args.dtype,
            batch_size=batch,
            latency_options={"cache_dir": cache_dir, "max_points": args.max_points,
                             "cuda_graphs": not args.no_cuda_graphs, "channels_last": True,
                             "warmup": 3, "rounds": args.rounds, "runs_per_round": args.runs, "max_verify": 4})
        lat = res.report.latency
        m = lat["model"]
        err = m.get("median_abs_error")
        note = (f"verified {lat['pruned_median_ms']:.3f} <= {lat['budget']['budget_ms']:.3f} ms (vs captured "
                f"{lat['original_median_ms']:.3f}); {m['layers_timed']} layers ({m['layers_measured_now']} timed now, "
                f"{m['table_seconds']:.0f}s)" + (f"; model err {err:.1%}" if err is not None else ""))
        return res.model, res.macs / res.base_macs, note

    def run_row(name, batch, kind, make):
        base = {"model": name, "batch": batch, "kind": kind}
        if out_of_time():
            emit({**base, "error": f"skipped: time limit {args.time_limit:.0f}s reached"})
            return
        t0 = time.perf_counter()
        try:
            pruned, kept, note = make()
            model, x, _ = loaded[name]
            orig_ms, pruned_ms, warns = pair(args, batch, x, model, pruned)
            note = "; ".join(s for s in [note, *warns] if s)
            emit({**base, "original_ms": orig_ms, "pruned_ms": pruned_ms, "speedup": orig_ms / pruned_ms,
                  "macs_kept": kept, "note": note + f" [{time.perf_counter() - t0:.0f}s]"})
        except Exception as err:  # noqa: BLE001
            emit({**base, "error": _err(err) + f" [{time.perf_counter() - t0:.0f}s]"})
        finally:
            if args.device == "cuda":
                torch.cuda.empty_cache()

    names = [m.strip() for m in args.models.split(",") if m.strip()]
    loaded = {}
    # phase 1 (cheap: one CPU compile per model, timing only): captured and MAC-budget rows
    for name in names:
        try:
            model, x = load(name, args.image_size)
            loaded[name] = (model, x, fxprune.compile(model, (x,), mac_budget=args.budget))
        except Exception as err:  # noqa: BLE001 - one model's failure must not stop the table
            emit({"model": name, "batch": batches[-1], "kind": "setup", "error": _err(err)})
            continue
        model, x, mac_res = loaded[name]
        run_row(name, batches[-1], "captured", lambda: (mac_res.original, 1.0, ""))
        for batch in batches:
            run_row(name, batch, f"mac {args.budget}", lambda: (mac_res.model, mac_res.macs / mac_res.base_macs, ""))
    # phase 2: latency budgets, batch by batch (the first batch size given first: 256 by default)
    for batch in batches:
        for name in names:
            if name in loaded:
                run_row(name, batch, f"latency {args.budget}", lambda: latency_plan(name, batch))
    elapsed = time.perf_counter() - t_start
    tail = f"\ntotal {elapsed:.0f}s\n"
    print(tail, flush=True)
    order = {n: i for i, n in enumerate(names)}
    kinds = {"setup": 0, "captured": 1}
    rows.sort(key=lambda r: (order.get(r["model"], 99), -r["batch"], kinds.get(r["kind"], 2 if r["kind"].startswith("mac") else 3)))
    text = head + "\n" + "\n".join(table + [row_text(r) for r in rows]) + "\n" + tail
    from fxprune._io import atomic_write

    atomic_write(os.path.join(args.outdir, "gpu_check.md"), text)
    atomic_write(os.path.join(args.outdir, "gpu_check.json"),
                 json.dumps({"device": device_name, "torch": torch.__version__, "args": vars(args), "rows": rows,
                             "seconds": elapsed}, indent=1, default=str))
    return 0


def _err(err):
    lines = [s for s in str(err).splitlines() if s.strip()]
    first = (lines[0] if lines else "")[:220]
    where = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    loc = f" ({os.path.basename(where.filename)}:{where.lineno})" if where is not None else ""
    return f"{type(err).__name__}: {first}{loc}".replace("|", "/")


if __name__ == "__main__":
    sys.exit(main())
