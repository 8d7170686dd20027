"""``fxprune bench``: time models interleaved and print a table (latency and items/s) or JSON.

ONNX files run on ONNX Runtime (``--runtime ort-cpu``, the default, or ``ort-cuda``); PyTorch models
run on PyTorch (``--runtime torch-cuda`` or ``torch-cpu``): model specs (``torchvision:resnet50``,
``timm:NAME``, ``file.py:factory``) or ``.fxp`` files saved by ``fxprune.save`` (give
``--input-shape``).

Examples::

    fxprune bench resnet50.onnx resnet50_pruned.onnx --batch-sizes 1,8 --threads 2
    fxprune bench bert.onnx --dim sequence=128 --json            # JSON on stdout, no table
    fxprune bench a.onnx b.onnx --json results.json              # table on stdout, JSON to the file
    fxprune bench torchvision:resnet50 pruned.fxp --runtime torch-cuda --dtype fp16 --cuda-graphs \
        --batch-sizes 1,64,256 --input-shape 1,3,224,224          # a batch sweep with throughput
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fxprune.bench import OPT_LEVELS, PROVIDERS, BenchConfig, benchmark
from fxprune.errors import BenchmarkError

__all__ = ["register", "run"]

logger = logging.getLogger(__name__)

_STDOUT = "-"


def register(sub) -> None:
    """Add the ``bench`` subcommand to the ``fxprune`` subparsers."""
    defaults = BenchConfig()
    p = sub.add_parser(
        "bench",
        help="measure ONNX Runtime latency of one or more ONNX models (interleaved A/B)",
        description=(
            "Time ONNX models on ONNX Runtime under identical conditions: warm-up, then interleaved "
            "rounds with the model order rotated each round. Prints median/p90/min/max per model and "
            "batch size, and the speed-up against the first model."
        ),
    )
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="ONNX files (ONNX Runtime) or, with a torch runtime, model specs / .fxp files; "
                        "the first is the reference")
    p.add_argument("--runtime", choices=("ort-cpu", "ort-cuda", "ort-trt", "torch-cpu", "torch-cuda"), default=None,
                   help="where to time (default: ONNX Runtime with --provider)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="torch runtimes: precision of weights and inputs (default fp32)")
    p.add_argument("--cuda-graphs", action="store_true", help="torch-cuda: capture each model in a CUDA graph")
    p.add_argument("--channels-last", action="store_true", help="torch runtimes: channels_last memory format")
    p.add_argument("--input-shape", default=None, metavar="1,3,224,224",
                   help="torch runtimes: example input shape (needed for .fxp files)")
    p.add_argument(
        "--batch-sizes", type=_batch_sizes, default=defaults.batch_sizes, metavar="B[,B...]",
        help="comma-separated batch sizes (default: 1)",
    )
    p.add_argument(
        "--threads", type=_positive, default=None, metavar="N",
        help="intra-op threads (default: number of physical cores)",
    )
    p.add_argument(
        "--opt-level", choices=OPT_LEVELS, default=defaults.opt_level,
        help="graph optimisation level (default: all)",
    )
    p.add_argument(
        "--provider", choices=tuple(PROVIDERS), default=defaults.provider,
        help="execution provider (default: cpu)",
    )
    p.add_argument(
        "--warmup", type=_non_negative, default=defaults.warmup, metavar="N",
        help=f"untimed warm-up runs per model (default: {defaults.warmup})",
    )
    p.add_argument(
        "--rounds", type=_positive, default=defaults.rounds, metavar="N",
        help=f"interleaved rounds; the model order rotates every round (default: {defaults.rounds})",
    )
    p.add_argument(
        "--runs", type=_positive, default=defaults.runs_per_round, metavar="N",
        help=f"timed runs per model and round (default: {defaults.runs_per_round})",
    )
    p.add_argument(
        "--dim", type=_dim, action="append", default=[], metavar="NAME=VALUE",
        help="size of a symbolic input dimension other than the batch (repeatable)",
    )
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the generated inputs")
    p.add_argument(
        "--json", nargs="?", const=_STDOUT, default=None, metavar="PATH",
        help="write JSON (schema fxprune.bench/1): to stdout instead of the table, or to PATH",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed ``args``; print the table and/or write JSON."""
    if args.json not in (None, _STDOUT):
        _check_json_target(Path(args.json), args.models)
        from fxprune._io import check_writable

        problem = check_writable(args.json, "--json")
        if problem:
            raise BenchmarkError(f"cannot write the JSON report: {problem}. Nothing was measured.")
    runtime = args.runtime or f"ort-{args.provider}"
    config = BenchConfig(
        runtime=runtime,
        dtype=args.dtype,
        cuda_graphs=args.cuda_graphs,
        channels_last=args.channels_last,
        provider=args.provider,
        threads=args.threads,
        opt_level=args.opt_level,
        batch_sizes=args.batch_sizes,
        warmup=args.warmup,
        rounds=args.rounds,
        runs_per_round=args.runs,
        dims=dict(args.dim),
        seed=args.seed,
    )
    if config.runtime == "torch":
        models, labels, inputs = _torch_models(args.models, args.input_shape)
        report = benchmark(models, config, labels=labels, inputs=inputs)
    else:
        report = benchmark(args.models, config)
    if args.json == _STDOUT:
        print(report.to_json())
        return 0
    if args.json is not None:
        _write(Path(args.json), report.to_json() + "\n")
    print(report.format_table())
    return 0


def _torch_models(specs: list[str], input_shape: str | None):
    """``(modules, labels, example inputs)`` for the torch runtimes: model specs or ``.fxp`` files."""
    import torch

    import fxprune
    from fxprune.models import parse_shape, resolve_model

    shape = parse_shape(input_shape) if input_shape else None
    models, labels, inputs = [], [], None
    for spec in specs:
        if spec.endswith(".onnx"):
            raise BenchmarkError(f"{spec}: ONNX files run on ONNX Runtime (--runtime ort-cpu / ort-cuda); the torch "
                                 "runtimes take model specs (torchvision:NAME, file.py:factory) or .fxp files")
        if spec.endswith(".fxp"):
            if shape is None:
                raise BenchmarkError(f"{spec}: give the example input shape with --input-shape (e.g. 1,3,224,224)")
            models.append(fxprune.load(spec))
            labels.append(Path(spec).name)
            continue
        resolved = resolve_model(spec, input_shape=shape)
        models.append(resolved.model.eval())
        labels.append(resolved.label)
        if inputs is None:
            ex = resolved.example_inputs
            inputs = tuple(ex) if isinstance(ex, (tuple, list)) else (ex,)
    if inputs is None:
        inputs = (torch.randn(*shape),)
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return models, unique, inputs


def _check_json_target(path: Path, models: list[str]) -> None:
    """Refuse a JSON path that is a model: ``--json a.onnx b.onnx`` would overwrite ``a.onnx``."""
    if path.suffix.lower() == ".onnx" or any(path.resolve() == Path(m).resolve() for m in models):
        raise BenchmarkError(
            f"--json {path} looks like a model file and would be overwritten; give a .json path "
            f"or put --json after the models to print JSON on stdout"
        )


def _write(path: Path, text: str) -> None:
    from fxprune._io import atomic_write

    try:
        atomic_write(path, text)
    except OSError as err:
        raise BenchmarkError(f"cannot write the JSON report to {path}: {err.strerror or err}") from err
    logger.info("wrote %s", path)


def _positive(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected zero or a positive integer, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _batch_sizes(text: str) -> tuple[int, ...]:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("expected comma-separated batch sizes, e.g. 1,8")
    return tuple(_positive(part) for part in parts)


def _dim(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, e.g. sequence=128, got {text!r}")
    return name.strip(), _positive(value.strip())
