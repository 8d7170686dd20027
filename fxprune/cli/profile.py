"""``fxprune profile MODEL``: MACs, parameters and the top modules by MACs."""

from __future__ import annotations

import json
import sys

from fxprune.budget import format_macs


def register(sub) -> None:
    p = sub.add_parser("profile", help="count MACs and parameters, with a per-module breakdown",
                       description="Count the multiply-accumulates (MACs) of a model analytically over its "
                                   "torch.fx graph. MODEL: torchvision:NAME, timm:NAME, hf:NAME or file.py:factory.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224 (default: the model's own)")
    p.add_argument("--top", type=int, default=20, help="how many modules to list (default 20)")
    p.add_argument("--depth", type=int, default=0, help="aggregate modules by the first N path components")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--graph", action="store_true",
                   help="print the captured graph, one line per node, with MACs and dependency groups")
    p.set_defaults(func=run)


def run(args) -> int:
    import time

    from fxprune.counting import profile_macs
    from fxprune.models import parse_shape, resolve_model

    shape = parse_shape(args.input_shape) if args.input_shape else None
    spec = resolve_model(args.model, input_shape=shape)
    t = time.perf_counter()
    prof = profile_macs(spec.model, spec.example_inputs)
    seconds = time.perf_counter() - t
    if args.json:
        out = prof.to_json()
        out["model"] = spec.label
        out["seconds"] = round(seconds, 3)
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    if args.graph:
        print(prof.annotated_graph())
        print()
    shapes = _shapes(spec.example_inputs)
    print(f"{spec.label}  input {shapes}")
    print(f"MACs   {format_macs(prof.total)}MAC  ({prof.total:,})   FLOPs ~ {format_macs(2 * prof.total)}")
    print(f"params {prof.params / 1e6:.3f} M  ({prof.params:,})")
    rows = sorted(prof.by_prefix(args.depth).items(), key=lambda kv: -kv[1])[: args.top] if args.depth else prof.top_modules(args.top)
    width = max([len(n) for n, _ in rows] + [6])
    print(f"\n{'module':{width}s} {'MACs':>12s} {'share':>7s}")
    for name, macs in rows:
        print(f"{name:{width}s} {format_macs(macs):>12s} {macs / max(prof.total, 1):7.2%}")
    if prof.measured:
        print(f"\nmeasured (no exact rule; torch.utils.flop_counter on fake tensors): "
              + ", ".join(f"{n} {format_macs(m)}" for n, m in list(prof.measured.items())[:8]))
    if not prof.exact:
        print("\nwarning: the MAC count is NOT exact; not counted: " + ("; ".join(prof.uncounted[:8]) or
              (prof.calibration.failed if prof.calibration is not None else "?")))
    print(f"\n({seconds:.2f}s)")
    return 0


def _shapes(inputs) -> str:
    if isinstance(inputs, dict):
        return ", ".join(f"{k}={tuple(v.shape)}" for k, v in inputs.items())
    return ", ".join(str(tuple(t.shape)) for t in inputs)
