"""``fxprune compile MODEL --mac-budget 50% -o model.onnx``: prune to a budget, export, summarise."""

from __future__ import annotations

import json
import os
import sys
import time

from fxprune.bench import OPT_LEVELS
from fxprune.runtimes import DTYPES, TARGETS


def register(sub) -> None:
    p = sub.add_parser(
        "compile", help="prune a model to a MAC (or latency) budget and export it to ONNX",
        description="Compile MODEL (torchvision:NAME, timm:NAME, hf:NAME or file.py:factory) to a hard MAC "
                    "budget: the result's MACs are at most the budget and within the tolerance below it.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--mac-budget", help="fraction ('50%%', 0.5) or absolute MACs ('1.8G', '500M')")
    p.add_argument("--latency-budget",
                   help="measured latency on --target ('20ms', '60%%' of the original); with --mac-budget both hold")
    p.add_argument("-o", "--output", help="write the pruned model as ONNX to this file (dynamic batch)")
    p.add_argument("--save", help="also save the pruned model in fxprune's format (.fxp)")
    p.add_argument("--save-pretrained", metavar="DIR",
                   help="Hugging Face decoders (LLaMA, Mistral, Qwen2/3, Phi-3, GPT-2): save the pruned model as "
                        "its original class with save_pretrained (loads with from_pretrained)")
    p.add_argument("--report", help="write the full JSON report to this file")
    p.add_argument("--json", action="store_true", help="print the JSON report instead of tables")
    p.add_argument("--policy", default="global", help="uniform | global | isomorphic | agentic | rl (default global)")
    p.add_argument("--tolerance", type=float, default=0.01, help="band below the budget (default 0.01 = 1%%)")
    p.add_argument("--channel-multiple", type=int, default=8, help="kept channels are multiples of this (default 8)")
    p.add_argument("--grouped-convs", choices=("within", "whole"), default=None,
                   help="grouped convs with more groups than channels per group: prune within every group or by "
                        "whole groups (default: whole with --latency-budget, within otherwise)")
    p.add_argument("--min-keep-ratio", type=float, default=0.1, help="every group keeps at least this fraction")
    p.add_argument("--importance", default="l1", help="l1 | l2 | bn_scale | taylor | snip | grasp | synflow")
    p.add_argument("--ignore", action="append", default=[], help="module name to leave untouched (repeatable)")
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224 (default: the model's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrained", action="store_true", help="load the source's pretrained weights (may download)")
    p.add_argument("--groups", action="store_true", help="also print the per-group table")
    p.add_argument("--plan-only", action="store_true",
                   help="print the plan (keep counts per group, exact MACs, params) without building the model")
    p.add_argument("--threads", type=int, default=None,
                   help="with --latency-budget: ONNX Runtime intra-op threads (default: physical cores)")
    p.add_argument("--opt-level", choices=OPT_LEVELS, default="all",
                   help="with --latency-budget: ONNX Runtime graph optimisation level (default all)")
    p.add_argument("--target", choices=tuple(TARGETS), default=None,
                   help="with --latency-budget: where latency is measured (default ort-cpu)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="with --latency-budget on a torch target: fp32 (default), fp16 or bf16")
    p.add_argument("--batch-size", type=int, default=None, help="with --latency-budget: batch measured at (default 1)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="with --target torch-cuda: time eagerly")
    p.add_argument("--allocation", choices=("latency", "macs"), default="latency",
                   help="with --latency-budget: allocate channels by the measured per-layer latency model "
                        "(default) or by MACs on a measured latency(MACs) curve")
    p.set_defaults(func=run)


def _check_outputs(args) -> None:
    """Every file the run will write must be writable, checked before the (long) compile starts."""
    from fxprune._io import check_writable
    from fxprune.errors import ConfigError

    targets = [(args.output, "-o/--output"), (args.save, "--save"), (args.report, "--report")]
    given = [(path, flag) for path, flag in targets if path]
    for path, flag in given:
        problem = check_writable(path, flag)
        if problem:
            raise ConfigError(f"{problem}. Nothing was compiled.")
    if args.save_pretrained:  # a directory: it may exist (as a directory) or be created in a writable parent
        d = args.save_pretrained
        if os.path.exists(d) and not os.path.isdir(d):
            raise ConfigError(f"--save-pretrained {d!r} exists and is not a directory. Nothing was compiled.")
        parent = d if os.path.isdir(d) else (os.path.dirname(os.path.abspath(d)) or ".")
        if not os.path.isdir(parent):
            raise ConfigError(f"--save-pretrained {d!r}: the directory {parent!r} does not exist; create it first. "
                              "Nothing was compiled.")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"--save-pretrained {d!r}: {parent!r} is not writable. Nothing was compiled.")
    paths = [os.path.realpath(path) for path, _ in given]
    if len(set(paths)) != len(paths):
        raise ConfigError("-o, --save and --report must name different files. Nothing was compiled.")


def run(args) -> int:
    import fxprune
    from fxprune._io import atomic_write
    from fxprune.errors import ConfigError, InvalidBudgetError
    from fxprune.models import parse_shape, resolve_model

    if args.plan_only and (args.output or args.save or args.save_pretrained or args.latency_budget):
        raise ConfigError("--plan-only builds no model: drop -o/--save/--save-pretrained, and give --mac-budget "
                          "(not --latency-budget)")
    if args.mac_budget is None and args.latency_budget is None:
        raise InvalidBudgetError("give --mac-budget (e.g. 50%) and/or --latency-budget (e.g. 20ms or 60%)")
    if args.latency_budget is None and (args.target or args.dtype or args.batch_size):
        raise InvalidBudgetError("--target, --dtype and --batch-size say where --latency-budget is measured; "
                                 "give --latency-budget too")
    _check_outputs(args)
    shape = parse_shape(args.input_shape) if args.input_shape else None
    spec = resolve_model(args.model, input_shape=shape, pretrained=args.pretrained)
    t = time.perf_counter()
    result = fxprune.compile(
        spec.model, spec.example_inputs,
        mac_budget=args.mac_budget, latency_budget=args.latency_budget, tolerance=args.tolerance,
        policy=args.policy, channel_multiple=args.channel_multiple, min_keep_ratio=args.min_keep_ratio,
        grouped_convs=args.grouped_convs,
        importance=args.importance, ignore=args.ignore or None, seed=args.seed,
        verify="onnx" if args.output else True,  # an ONNX failure then heals like any other
        latency_options=({"threads": args.threads, "opt_level": args.opt_level, "allocation": args.allocation,
                          "cuda_graphs": not args.no_cuda_graphs} if args.latency_budget else None),
        target=args.target if args.latency_budget else None,
        dtype=args.dtype if args.latency_budget else None,
        batch_size=args.batch_size if args.latency_budget else None,
        plan_only=args.plan_only,
    )
    result.report.model = spec.label
    export_s = None
    if args.output:
        t1 = time.perf_counter()
        result.export_onnx(args.output)
        export_s = time.perf_counter() - t1
        result.report.timings["onnx_export"] = export_s
    if args.save:
        result.save(args.save)
    if args.save_pretrained:
        from fxprune.hf import save_pretrained

        save_pretrained(result, args.save_pretrained)
    total = time.perf_counter() - t
    if args.report:
        try:
            atomic_write(args.report, result.report.dumps())
        except OSError as err:
            from fxprune.errors import ConfigError

            raise ConfigError(f"cannot write the report {args.report}: {err}") from err
    if args.json:
        json.dump(result.report.to_json(), sys.stdout, indent=2, default=str)
        print()
        return 0
    print(result.report)
    if args.groups:
        print()
        print(result.report.group_table())
    if args.output:
        print(f"wrote {args.output} (ONNX, dynamic batch; export {export_s:.2f}s)")
    if args.save:
        print(f"wrote {args.save}")
    if args.save_pretrained:
        print(f"wrote {args.save_pretrained} (save_pretrained; load with from_pretrained)")
    print(f"done in {total:.2f}s")
    return 0
