"""ONNX export of (pruned) models and ONNX Runtime output parity.

``export_onnx`` writes a model with a dynamic batch dimension (dim 0 of every input and output)
plus any extra dynamic axes the caller names. Two exporters are tried in order:

1. the TorchScript exporter (``torch.onnx.export(..., dynamo=False)``). On torch 2.14 (CPU) it
   exported fxprune's captured resnet18 / mobilenet_v2 / vit_b_16 / swin_t (224x224, Swin's window
   attention included) in 2.3 / 3.0 / 7.9 / 8.5 s with a working dynamic batch;
2. the ``torch.export``-based exporter (``dynamo=True``) as the fallback: 11-12 s for the first
   three, several times slower than that for swin_t, and it specialises a batch of 1 to a constant,
   so it is given the example inputs repeated to a batch of 2 when the batch is dynamic. It handles
   graphs the TorchScript tracer cannot (e.g. a non-tensor placeholder such as timm's ``is_causal``).

Input sizes the model accepts (sequence length, image height/width, audio length) are dynamic
axes too, named ``sequence``, ``height``, ``width``, ``time``: see :func:`export_onnx` and
:mod:`fxprune.dynamic_sizes`. Each is checked on ONNX Runtime at another size before the file
is written.

``onnx_parity`` runs the exported model on ONNX Runtime (CPU) and the PyTorch model (eval, no_grad)
on the same random inputs at several batch sizes, so the dynamic batch is really exercised.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import inspect
import logging
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import onnx
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

from fxprune._io import atomic_path, check_writable
from fxprune.capture import normalize_inputs
from fxprune.errors import ExportError

__all__ = [
    "EXPORTERS",
    "example_sizes",
    "OutputParity",
    "ParityResult",
    "export_onnx",
    "onnx_parity",
    "assert_onnx_parity",
]

logger = logging.getLogger(__name__)

#: Exporter names accepted by ``export_onnx(..., exporter=...)``; "auto" tries them in this order.
EXPORTERS = ("torchscript", "dynamo")
BATCH_AXIS_NAME = "batch"


# =========================================================================== export spec

@dataclass
class _ExportSpec:
    """What to export: positional inputs, ONNX names and dynamic axes."""

    inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    #: inputs at other sizes along the dynamic size axes, with the model's outputs there: the
    #: exported model must match them too (see ``_size_axes``)
    probes: list[Any] = field(default_factory=list)
    size_axes: dict[str, dict[int, str]] = field(default_factory=dict)


def _signature_names(model: nn.Module) -> list[str]:
    """Names of the model's forward inputs (placeholders of a GraphModule)."""
    if isinstance(model, torch.fx.GraphModule):
        targets = [str(n.target) for n in model.graph.nodes if n.op == "placeholder"]
        return [t for t in targets if not t.startswith("*")]
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
             inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds]


def _positional_inputs(model: nn.Module, example_inputs: Any) -> tuple[tuple[torch.Tensor, ...], list[str]]:
    """Example inputs as one positional tuple, and their names, in the model's signature order."""
    try:
        args, kwargs = normalize_inputs(example_inputs)
    except Exception as err:
        raise ExportError(f"ONNX export: invalid example_inputs ({err}).") from err
    names = _signature_names(model)
    unknown = sorted(set(kwargs) - set(names[len(args):]))
    if unknown:
        raise ExportError(
            f"ONNX export: keyword inputs {unknown} are not inputs of the model (it takes {names}).")
    inputs, used = list(args), []
    for name in names[len(args):]:
        if not kwargs.keys() - set(used):
            break
        if name not in kwargs:
            raise ExportError(
                f"ONNX export: example inputs give {sorted(kwargs)} by keyword but not {name!r}, which comes "
                "before them in the forward signature; pass the inputs positionally instead."
            )
        inputs.append(kwargs[name])
        used.append(name)
    for i, value in enumerate(inputs):
        if not isinstance(value, torch.Tensor):
            raise ExportError(
                f"ONNX export: example input {i} is a {type(value).__name__}; every input must be a tensor.")
    input_names = [names[i] if i < len(names) else f"input_{i}" for i in range(len(inputs))]
    return tuple(inputs), input_names


def _output_names(outputs: Any) -> list[str]:
    leaves = [t for t in tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    named = isinstance(outputs, Mapping) and all(isinstance(k, str) for k in outputs)
    if named and len(outputs) == len(leaves):
        return list(outputs.keys())
    if len(leaves) == 1:
        return ["output"]
    return [f"output_{i}" for i in range(len(leaves))]


def _normalize_axes(name: str, axes: Any) -> dict[int, str]:
    if isinstance(axes, Mapping):
        return {int(a): str(n) for a, n in axes.items()}
    if isinstance(axes, Sequence) and not isinstance(axes, str):
        return {int(a): f"{name}_dim{int(a)}" for a in axes}
    raise ExportError(
        f"ONNX export: dynamic_axes[{name!r}] must be a dict {{axis: name}} or a list of axes, got {axes!r}.")


def _dynamic_axes(spec: _ExportSpec, outputs: list[torch.Tensor], dynamic_batch: bool,
                  extra: Mapping[str, Any] | None) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    if dynamic_batch:
        for name, t in zip(spec.input_names + spec.output_names, list(spec.inputs) + outputs):
            if t.dim() >= 1:
                axes[name] = {0: BATCH_AXIS_NAME}
    known = set(spec.input_names) | set(spec.output_names)
    for name, value in (extra or {}).items():
        if name not in known:
            raise ExportError(
                f"ONNX export: dynamic_axes names {name!r}, which is not an input or output. "
                f"Inputs: {spec.input_names}; outputs: {spec.output_names}."
            )
        axes.setdefault(name, {}).update(_normalize_axes(name, value))
    return axes


# =========================================================================== helpers

@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every module in eval mode; restore each module's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
        yield


def _one_line(err: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {line[:300]}"


def _first_line(err: BaseException) -> str:
    """``Type: first line`` of ``err``, plus that of its root cause when it has one."""
    root = err
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    if root is err:
        return _one_line(err)
    return f"{_one_line(err)} (caused by {_one_line(root)})"


def _model_name(model: nn.Module) -> str:
    return type(model).__name__


# =========================================================================== exporters

_ANTIALIAS = {"aten::_upsample_bicubic2d_aa": ("cubic", -0.5), "aten::_upsample_bilinear2d_aa": ("linear", None)}
_antialias_registered = False


def _register_antialias_symbolics() -> None:
    """Teach the TorchScript exporter antialiased resizing (``F.interpolate(..., antialias=True)``,
    which timm's Hiera applies to its position embeddings at the input size): ONNX ``Resize``
    (opset 18+) with ``antialias=1`` and ``exclude_outside=1`` (PyTorch normalises the weights over
    the taps inside the image), bicubic with PIL's ``a = -0.5``. Matches onnxruntime to ~2e-6 for
    up- and downsampling. Registered once, for opset 18 and later; older opsets still reject the op."""
    global _antialias_registered
    if _antialias_registered:
        return
    _antialias_registered = True
    try:
        from torch.onnx._internal.torchscript_exporter import symbolic_helper as helper
    except ImportError:  # pragma: no cover - older torch
        try:
            from torch.onnx import symbolic_helper as helper
        except ImportError:
            return

    def symbolic(mode: str, coeff: float | None):
        def fn(g, input, output_size, align_corners, scale_factors):
            out = helper._interpolate_helper("upsample_aa", 4, mode)(g, input, output_size, align_corners,
                                                                     scale_factors)
            node = out.node()
            node.i_("antialias", 1)
            node.i_("exclude_outside", 1)
            if coeff is not None:
                node.f_("cubic_coeff_a", coeff)
            return out
        return fn

    for name, (mode, coeff) in _ANTIALIAS.items():
        try:
            torch.onnx.register_custom_op_symbolic(name, symbolic(mode, coeff), 18)
        except Exception as err:  # pragma: no cover - exporter internals moved: the op stays unsupported
            logger.debug("could not register an ONNX symbolic for %s: %s", name, err)


def _export_torchscript(model: nn.Module, spec: _ExportSpec, file: Path, opset: int | None) -> None:
    _register_antialias_symbolics()
    with _quiet_exporter(), contextlib.redirect_stderr(_LogStream()):
        torch.onnx.export(
            _exportable_twin(model),
            spec.inputs,
            str(file),
            dynamo=False,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes or None,
            opset_version=opset,
            do_constant_folding=True,
        )


def _size_max(a: Any, b: Any) -> Any:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.maximum(torch.as_tensor(a), torch.as_tensor(b))
    return torch.sym_max(a, b)


def _size_min(a: Any, b: Any) -> Any:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.minimum(torch.as_tensor(a), torch.as_tensor(b))
    return torch.sym_min(a, b)


def _size_ceil(a: Any) -> Any:
    return torch.ceil(a).to(torch.int64) if isinstance(a, torch.Tensor) else math.ceil(a)


def _size_floor(a: Any) -> Any:
    return torch.floor(a).to(torch.int64) if isinstance(a, torch.Tensor) else math.floor(a)


def _histc_exportable(x: torch.Tensor, bins: int = 100, min: float = 0, max: float = 0) -> torch.Tensor:  # noqa: A002
    """``torch.histc`` from ops ONNX has (``floor``, ``one_hot``, ``sum``): a mixture of experts
    counts its tokens per expert with it."""
    flat = x.reshape(-1).float()
    lo, hi = (flat.min(), flat.max()) if min == max else (torch.tensor(float(min)), torch.tensor(float(max)))
    width = torch.clamp(hi - lo, min=1e-12)
    idx = torch.floor((flat - lo) * (bins / width)).clamp(0, bins - 1).long()
    inside = ((flat >= lo) & (flat <= hi)).float()
    return (F.one_hot(idx, bins).float() * inside[:, None]).sum(0).to(x.dtype)


def _grouped_mm_exportable(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor | None = None,
                           bias: torch.Tensor | None = None, out_dtype: Any = None) -> torch.Tensor:
    """A grouped matmul (rows ``offs[e-1]:offs[e]`` of ``x`` through expert ``e``) as one gather and
    one matmul per expert, with the row ranges computed in the graph: every routed row is multiplied
    once, as in the fused kernel, and the token count stays dynamic."""
    if offs is None:
        out = torch.bmm(x, w)
    else:
        outs, start = [], torch.zeros((), dtype=torch.long)
        for e in range(w.shape[0]):
            end = offs[e].long()
            part = x.index_select(0, torch.arange(start, end, dtype=torch.long)) @ w[e]
            outs.append(part + bias[e] if bias is not None else part)
            start = end
        out = torch.cat(outs, 0)
    return out.to(out_dtype) if out_dtype is not None else out


_TRACEABLE_SIZE_MATH = {torch.sym_max: _size_max, torch.sym_min: _size_min, math.ceil: _size_ceil,
                        math.floor: _size_floor}
#: ops with no ONNX form, by qualified name, and their exportable equivalents
_EXPORTABLE_OPS = {"aten::histc": _histc_exportable, "aten::_grouped_mm": _grouped_mm_exportable,
                   "transformers::grouped_mm_fallback": _grouped_mm_exportable}


def _export_substitute(target: Any) -> Any:
    if target in _TRACEABLE_SIZE_MATH:
        return _TRACEABLE_SIZE_MATH[target]
    packet = getattr(target, "overloadpacket", None)
    return _EXPORTABLE_OPS.get(getattr(packet, "_qualified_op_name", None))


def _exportable_twin(model: nn.Module) -> nn.Module:
    """``model``, or a graph-module twin sharing its modules, whose integer size arithmetic also
    accepts the 0-d tensors the TorchScript exporter hands out for sizes (so a size such as timm's
    TF-``SAME`` padding, ``max(ceil(x / s) ... - x, 0)``, stays a computation in the ONNX graph), and
    whose ops without an ONNX form (``histc``, grouped matmuls: mixtures of experts) are written with
    ops that have one (:data:`_EXPORTABLE_OPS`)."""
    if not isinstance(model, torch.fx.GraphModule):
        return model
    if not any(n.op == "call_function" and _export_substitute(n.target) is not None for n in model.graph.nodes):
        return model
    graph = copy.deepcopy(model.graph)
    for n in graph.nodes:
        sub = _export_substitute(n.target) if n.op == "call_function" else None
        if sub is not None:
            n.target = sub
    twin = torch.fx.GraphModule(model, graph, type(model).__name__)
    twin.train(model.training)
    return twin


def _dim_name(name: str) -> str:
    ident = re.sub(r"\W", "_", name)
    return ident if ident and not ident[0].isdigit() else f"d_{ident}"


def _dynamo_inputs(spec: _ExportSpec) -> tuple[tuple[torch.Tensor, ...], tuple[dict[int, Any] | None, ...]]:
    """Inputs and ``dynamic_shapes`` for torch.export.

    A dynamic axis of size 1 is widened to 2: torch.export specialises sizes 0 and 1 to constants.
    """
    dims: dict[str, Any] = {}
    inputs, shapes = [], []
    for name, t in zip(spec.input_names, spec.inputs):
        axes = spec.dynamic_axes.get(name, {})
        for axis, dim in axes.items():
            if t.dim() > axis and t.shape[axis] == 1:
                t = torch.cat([t, t], dim=axis)
        inputs.append(t)
        shape = {axis: dims.setdefault(d, torch.export.Dim(_dim_name(d))) for axis, d in axes.items()}
        shapes.append(shape or None)
    return tuple(inputs), tuple(shapes)


def _export_dynamo(model: nn.Module, spec: _ExportSpec, file: Path, opset: int | None) -> None:
    inputs, shapes = _dynamo_inputs(spec)
    chatter = _LogStream()
    with _quiet_exporter(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        program = torch.onnx.export(
            model,
            inputs,
            dynamo=True,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=shapes if any(s is not None for s in shapes) else None,
            opset_version=opset,
            verbose=False,
            optimize=True,
        )
        program.save(str(file))


class _LogStream:
    """stdout/stderr replacement that sends exporter chatter (progress lines, the traceback torch.fx
    prints when generated code raises) to the debug log instead of the terminal."""

    def write(self, text: str) -> int:
        if text.strip():
            logger.debug("%s", text.rstrip())
        return len(text)

    def flush(self) -> None:
        pass


_EXPORT_FUNCS = {"torchscript": _export_torchscript, "dynamo": _export_dynamo}


def _check_dynamic_axes(proto: onnx.ModelProto, spec: _ExportSpec) -> None:
    """Every requested dynamic input axis must be symbolic in the exported graph."""
    for value in proto.graph.input:
        for axis in spec.dynamic_axes.get(value.name, {}):
            dims = value.type.tensor_type.shape.dim
            if axis < len(dims) and dims[axis].HasField("dim_value"):
                raise ValueError(
                    f"axis {axis} of input {value.name!r} was exported as the constant "
                    f"{dims[axis].dim_value}")


def _try_exporter(exporter: str, model: nn.Module, spec: _ExportSpec, file: Path, opset: int | None,
                  check: bool) -> onnx.ModelProto:
    """Run one exporter; raises ``_StepFailed`` naming the step that failed."""
    try:
        _EXPORT_FUNCS[exporter](model, spec, file, opset)
    except Exception as err:
        raise _StepFailed(f"{exporter} export", err) from err
    try:
        proto = onnx.load(str(file))
    except Exception as err:
        raise _StepFailed("loading the exported file", err) from err
    if check:
        try:
            onnx.checker.check_model(str(file))
        except Exception as err:
            raise _StepFailed("onnx.checker", err) from err
    try:
        _check_dynamic_axes(proto, spec)
    except ValueError as err:
        raise _StepFailed("dynamic axes", err) from err
    try:
        _check_probes(proto, spec)
    except Exception as err:
        raise _StepFailed("dynamic sizes", err) from err
    return proto


def _check_probes(proto: onnx.ModelProto, spec: _ExportSpec) -> None:
    """The exported model reproduces the PyTorch model at the other sizes its size axes allow."""
    if not spec.probes:
        return
    session = _session(proto)
    names = [i.name for i in session.get_inputs()]
    for probe in spec.probes:
        by_name = dict(zip(spec.input_names, probe.inputs))
        feed = {n: by_name[n].detach().cpu().numpy() for n in names if n in by_name}
        got = session.run(None, feed)
        if len(got) != len(probe.outputs):
            raise ValueError(f"{len(got)} outputs instead of {len(probe.outputs)}")
        for name, g, want in zip(spec.output_names, got, probe.outputs):
            check = _compare(name, int(probe.inputs[0].shape[0]) if probe.inputs[0].dim() else 1,
                             np.asarray(g), want.detach().cpu().numpy(), 1e-4, 1e-3)
            if not check.ok:
                sizes = ", ".join(f"{spec.input_names[i]}[{d}]={n}" for (i, d), n in probe.sizes.items())
                raise ValueError(f"at {sizes} output {name!r} differs from PyTorch (max abs err "
                                 f"{check.max_abs_err:.3g})")


class _StepFailed(Exception):
    def __init__(self, step: str, err: BaseException):
        super().__init__(f"{step}: {_first_line(err)}")
        self.step = step
        self.err = err


def _build_spec(model: nn.Module, example_inputs: Any, dynamic_batch: bool,
                dynamic_axes: Mapping[str, Any] | None) -> _ExportSpec:
    inputs, input_names = _positional_inputs(model, example_inputs)
    try:
        with torch.no_grad():
            outputs = model(*inputs)
    except Exception as err:
        raise ExportError(
            f"ONNX export of {_model_name(model)}: the model fails on its example inputs in eval mode "
            f"({_first_line(err)})."
        ) from err
    leaves = [t for t in tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    spec = _ExportSpec(inputs, input_names, _output_names(outputs))
    spec.dynamic_axes = _dynamic_axes(spec, leaves, dynamic_batch, dynamic_axes)
    if dynamic_axes is None:
        spec.size_axes, spec.probes = _size_axes(model, spec, leaves)
        for name, axes in spec.size_axes.items():
            spec.dynamic_axes.setdefault(name, {}).update(axes)
    return spec


_AXIS_NAMES = {"sequence": "sequence", "height": "height", "width": "width", "time": "time"}


def _size_axes(model: nn.Module, spec: _ExportSpec, outputs: list[torch.Tensor]) -> tuple[dict[str, dict[int, str]], list[Any]]:
    """Dynamic size axes (sequence, height/width, time) of the inputs and of the outputs that follow.

    A graph captured with ``torch.export`` says which of its input dims are dynamic and at which
    other size it was checked (``gm.meta``, see :mod:`fxprune.dynamic_sizes`). For other models
    (torch.fx captures: torchvision, timm) the model is tried at other sizes
    (``dynamic_sizes.find_probes``): a size class it accepts is dynamic. Output axes are the output
    dims that change between the example and the probe; an output dim that follows an input dim
    (same size at both) shares its name. Returns the axes and the probes (the exported model must
    reproduce the PyTorch model there too).
    """
    from fxprune._export import META_DYNAMIC_DIMS
    from fxprune.dynamic_sizes import META_SIZE_PROBE, find_probes

    meta = getattr(model, "meta", None) if isinstance(model, torch.fx.GraphModule) else None
    index = {n: i for i, n in enumerate(spec.input_names)}
    dims = known = None
    if isinstance(meta, dict) and META_DYNAMIC_DIMS in meta:
        dims = {index[n]: [d for d in ds if d > 0] for n, ds in meta[META_DYNAMIC_DIMS].items() if n in index}
        known = {index[n]: dict(p) for n, p in (meta.get(META_SIZE_PROBE) or {}).items() if n in index}
    try:
        probes = find_probes(model, list(spec.inputs), len(spec.inputs), [], dims, known)
    except Exception as err:  # a model that cannot even be probed keeps fixed sizes
        logger.debug("size probe of %s failed: %s", _model_name(model), err)
        return {}, []
    axes: dict[str, dict[int, str]] = {}
    used: dict[str, int] = {}
    kept = []
    for probe in probes:
        names: dict[tuple[str, int, int], str] = {}  # (role, example size, probe size) -> axis name
        follows: dict[tuple[int, int], list[tuple[int, str]]] = {}  # sizes -> [(input dim, name)]
        for (i, d), role in probe.cls.roles.items():
            key = (role, int(spec.inputs[i].shape[d]), probe.sizes[(i, d)])
            if key not in names:
                base = _AXIS_NAMES.get(role, role)
                used[base] = used.get(base, 0) + 1
                names[key] = base if used[base] == 1 else f"{base}_{used[base]}"
                follows.setdefault(key[1:], []).append((d, names[key]))
            axes.setdefault(spec.input_names[i], {})[d] = names[key]
        if len(probe.outputs) != len(outputs):
            continue
        for name, a, b in zip(spec.output_names, outputs, probe.outputs):
            if a.dim() != b.dim():
                continue
            for d in range(1, a.dim()):
                if a.shape[d] != b.shape[d]:
                    # an output dim that follows an input dim shares its name (the same position
                    # first: height and width of a segmentation map)
                    cands = follows.get((int(a.shape[d]), int(b.shape[d])), [])
                    same = [n for dd, n in cands if dd == d] or [n for _, n in cands]
                    axes.setdefault(name, {})[d] = same[0] if same else f"{_dim_name(name)}_dim{d}"
        kept.append(probe)
    return axes, kept


def export_onnx(
    model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike | None = None,
    *,
    dynamic_batch: bool = True,
    dynamic_axes: Mapping[str, Any] | None = None,
    opset: int | None = None,
    check: bool = True,
    exporter: str = "auto",
) -> onnx.ModelProto:
    """Export ``model`` to ONNX (in eval mode; the caller's train/eval flags are restored).

    Args:
        model: the (pruned) model, normally a ``torch.fx.GraphModule``.
        example_inputs: a tensor, a tuple of tensors or a dict of keyword tensors.
        path: where to write the ``.onnx`` file; ``None`` exports to a temporary file.
        dynamic_batch: make dim 0 of every input and output a symbolic ``batch`` dimension.
        dynamic_axes: extra dynamic axes per input/output name, e.g.
            ``{"input_ids": {0: "batch", 1: "sequence"}}`` (a list of axes is accepted too).
            Input names are the graph's placeholder names; outputs are ``output`` (one output),
            ``output_0``, ``output_1``, ... or the keys of a dict output.
            When ``None``, the input sizes the model accepts are dynamic too: sequence lengths,
            image height/width, audio length (the dims a ``torch.export`` capture settled as
            dynamic; for other models, the size classes it runs at another size), on the inputs
            and on the outputs that follow them. The exported model must then reproduce PyTorch at
            that other size; an exporter that bakes a size in is run again with the example's
            sizes (logged). The example's sizes are stored in the metadata
            (``fxprune.example_sizes``) for ``fxprune bench``.
        opset: ONNX opset version; ``None`` takes the exporter's default.
        check: run ``onnx.checker.check_model`` on the result.
        exporter: ``"auto"`` (TorchScript exporter, then the dynamo exporter if it fails),
            ``"torchscript"`` or ``"dynamo"``.

    Returns:
        The exported ``onnx.ModelProto``.

    Raises:
        ExportError: the inputs do not fit the model, or every exporter failed; the message names
            the step that failed (export, load, onnx.checker, dynamic axes) and why.
    """
    order = EXPORTERS if exporter == "auto" else (exporter,)
    if any(e not in _EXPORT_FUNCS for e in order):
        raise ExportError(
            f"ONNX export: unknown exporter {exporter!r}; use 'auto', 'torchscript' or 'dynamo'.")
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise ExportError(f"ONNX export: path must be a file path (str or pathlib.Path) or None, got {path!r:.80}.")
    target = Path(path) if path is not None else None
    if target is not None:
        problem = check_writable(target, "ONNX output")
        if problem:
            raise ExportError(f"ONNX export: {problem}.")
    with _eval_mode(model):
        spec = _build_spec(model, example_inputs, dynamic_batch, dynamic_axes)
        # the exporters write into a private directory (next to the target, so the final rename is
        # atomic); the target is replaced only by a file that exported and checked completely
        tmp_parent = (target.parent if str(target.parent) else Path(".")) if target is not None else None
        with tempfile.TemporaryDirectory(prefix=".fxprune_onnx_", dir=tmp_parent) as tmp:
            file = Path(tmp) / "model.onnx"
            failures: list[_StepFailed] = []
            for name in order:
                try:
                    proto = _try_exporter(name, model, spec, file, opset, check)
                except _StepFailed as failed:
                    logger.info("ONNX export of %s with the %s exporter failed at %s",
                                _model_name(model), name, failed)
                    _raise_if_storage_failed(model, failed, file.parent.parent)
                    failures.append(failed)
                    if failed.step != "dynamic sizes" or not spec.size_axes:
                        continue
                    # the exporter baked a size in: the same (fast) exporter with fixed sizes
                    # before a slower one with dynamic sizes
                    _drop_size_axes(spec)
                    try:
                        proto = _try_exporter(name, model, spec, file, opset, check)
                    except _StepFailed as again:
                        failures.append(again)
                        continue
                if failures:
                    logger.warning("ONNX export of %s: %s; exported with the %s exporter%s instead",
                                   _model_name(model), "; ".join(str(f) for f in failures), name,
                                   "" if spec.size_axes or not any(f.step == "dynamic sizes" for f in failures)
                                   else " and the input sizes of the example")
                logger.info("exported %s to ONNX with the %s exporter", _model_name(model), name)
                _record_example_sizes(proto, spec, file if target is not None else None)
                if target is not None:
                    _publish(file, target)
                return proto
    raise _export_error(model, failures)


EXAMPLE_SIZES_KEY = "fxprune.example_sizes"


def _record_example_sizes(proto: onnx.ModelProto, spec: _ExportSpec, file: Path | None) -> None:
    """Store the example's sizes of the named dynamic dims (``{"height": 224, ...}``) in the model's
    metadata, so ``fxprune bench`` times it at those sizes without ``--dim``."""
    import json

    sizes = example_sizes(proto, spec.inputs)
    if not sizes:
        return
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props},
                                        EXAMPLE_SIZES_KEY: json.dumps(sizes, sort_keys=True)})
    if file is not None and proto.ByteSize() < 2**31 - 1 and len(list(file.parent.iterdir())) == 1:
        file.write_bytes(proto.SerializeToString())  # the private copy, published atomically after


def example_sizes(proto: onnx.ModelProto, example_inputs: Any) -> dict[str, int]:
    """``{dim_param: size}`` of the exported model's named non-batch input dims at ``example_inputs``
    (what a benchmark of a compile result should feed: the sizes it was compiled at)."""
    try:
        args, kwargs = normalize_inputs(example_inputs)
    except Exception:
        return {}
    tensors = [t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)]
    by_name = dict(kwargs)
    out: dict[str, int] = {}
    for i, value in enumerate(proto.graph.input):
        t = by_name.get(value.name, tensors[i] if i < len(tensors) else None)
        if not isinstance(t, torch.Tensor):
            continue
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if axis > 0 and dim.dim_param and axis < t.dim():
                out.setdefault(dim.dim_param, int(t.shape[axis]))
    return out


def _drop_size_axes(spec: _ExportSpec) -> None:
    """Keep the batch (and user-given) axes only: the size axes did not export faithfully."""
    for name, axes in spec.size_axes.items():
        for d in axes:
            spec.dynamic_axes.get(name, {}).pop(d, None)
    spec.size_axes, spec.probes = {}, []


def _publish(file: Path, target: Path) -> None:
    """Move the exported ``file`` (and any external-data files beside it) to ``target`` atomically."""
    try:
        for extra in sorted(file.parent.iterdir()):
            if extra != file:  # external data: referenced by relative name, so it goes next to the target
                os.replace(extra, target.parent / extra.name)
        with atomic_path(target) as tmp:
            os.replace(file, tmp)
    except OSError as err:
        raise ExportError(f"ONNX export: cannot write {target}: {err}. The previous file, if any, is unchanged.") from err


# errors of the file system, not of the model: another exporter cannot do better, and the operator hint
# of _export_error would send the user the wrong way
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def _storage_error(err: BaseException | None) -> OSError | None:
    """The file-system ``OSError`` in ``err``'s cause/context chain, if any."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _STORAGE_ERRNOS:
            return err
        err = err.__cause__ or err.__context__
    return None


def _raise_if_storage_failed(model: nn.Module, failed: _StepFailed, directory: Path) -> None:
    """An exporter failed because the disk refused the file: stop with that, not 'unsupported operator'."""
    err = _storage_error(failed.err)
    if err is None:
        return
    what = os.strerror(err.errno) if err.errno else str(err)
    raise ExportError(
        f"ONNX export of {_model_name(model)}: cannot write the ONNX file in {str(directory)!r} "
        f"({failed.step}: [Errno {err.errno}] {what}). The model itself was not the problem: free space "
        f"there, or export to another directory; with path=None the file goes to "
        f"the temporary directory (set TMPDIR to move it).") from err


def _export_error(model: nn.Module, failures: list[_StepFailed]) -> ExportError:
    tried = "; ".join(str(f) for f in failures)
    hint = ("If an operator is unsupported, replace it with supported torch ops, or try a different opset= "
            "or exporter=.")
    error = ExportError(f"ONNX export of {_model_name(model)} failed. Tried: {tried}. {hint}")
    error.__cause__ = failures[-1].err
    return error


# =========================================================================== parity

@dataclass(frozen=True)
class OutputParity:
    """Comparison of one output at one batch size.

    ``max_rel_err`` is ``max(|onnx - torch| / max(|torch|, atol))``: relative to the PyTorch value,
    floored at ``atol`` so that near-zero references do not dominate.
    """

    name: str
    batch_size: int
    shape: tuple[int, ...]
    max_abs_err: float
    max_rel_err: float
    ok: bool


@dataclass
class ParityResult:
    """ONNX Runtime vs PyTorch outputs at every batch size tried."""

    ok: bool
    atol: float
    rtol: float
    batch_sizes: tuple[int, ...]
    checks: list[OutputParity]

    @property
    def max_abs_err(self) -> dict[str, float]:
        """Largest absolute error per output name, over all batch sizes."""
        return self._worst("max_abs_err")

    @property
    def max_rel_err(self) -> dict[str, float]:
        """Largest relative error per output name, over all batch sizes."""
        return self._worst("max_rel_err")

    def _worst(self, attr: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for c in self.checks:
            out[c.name] = max(out.get(c.name, 0.0), getattr(c, attr))
        return out

    def summary(self) -> str:
        """One line per output and batch size."""
        head = f"ONNX parity {'ok' if self.ok else 'FAILED'} (atol={self.atol:g}, rtol={self.rtol:g})"
        lines = [f"  {c.name} batch={c.batch_size} shape={list(c.shape)}: max abs err {c.max_abs_err:.3g}, "
                 f"max rel err {c.max_rel_err:.3g}{'' if c.ok else '  <-- mismatch'}" for c in self.checks]
        return "\n".join([head] + lines)


def _random_like(example: torch.Tensor, batch: int, gen: torch.Generator) -> torch.Tensor:
    """Random tensor shaped like ``example`` with dim 0 set to ``batch``, in the example's value range."""
    shape = (batch,) + tuple(example.shape[1:]) if example.dim() >= 1 else ()
    if example.dtype.is_floating_point or example.dtype.is_complex:
        return torch.randn(shape, generator=gen, dtype=example.dtype)
    if example.numel() == 0:
        return torch.zeros(shape, dtype=example.dtype)
    low, high = int(example.min()), int(example.max())
    if example.dtype == torch.bool:
        return torch.randint(low, high + 1, shape, generator=gen).bool()
    return torch.randint(low, high + 1, shape, generator=gen, dtype=torch.int64).to(example.dtype)


def _session(onnx_model_or_path: Any) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        if isinstance(onnx_model_or_path, onnx.ModelProto):
            source = onnx_model_or_path.SerializeToString()
        else:
            source = str(onnx_model_or_path)
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise ExportError(f"ONNX parity: onnxruntime cannot load the model ({_first_line(err)}).") from err


def _compare(name: str, batch: int, got: np.ndarray, want: np.ndarray, atol: float,
             rtol: float) -> OutputParity:
    if got.shape != want.shape:
        return OutputParity(name, batch, tuple(want.shape), float("inf"), float("inf"), False)
    got64 = got.astype(np.complex128 if np.iscomplexobj(got) else np.float64)
    want64 = want.astype(np.complex128 if np.iscomplexobj(want) else np.float64)
    diff = np.abs(got64 - want64)
    both_nan = np.isnan(got64) & np.isnan(want64)
    diff = np.where(both_nan, 0.0, np.where(np.isnan(diff), np.inf, diff))
    ref = np.abs(np.where(both_nan, 0.0, want64))
    # float32 rounding grows with the magnitudes the network computes, not with each element: an
    # output of scale 1000 (deep random-weight nets) carries ~1e-4 of error even where an element is
    # near 0, so atol applies to outputs of scale <= 1 and grows with the output's largest value
    finite = ref[np.isfinite(ref)]
    scale = max(1.0, float(finite.max())) if finite.size else 1.0
    ok = bool(np.all(diff <= atol * scale + rtol * ref))
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float((diff / np.maximum(ref, atol)).max()) if diff.size else 0.0
    return OutputParity(name, batch, tuple(want.shape), max_abs, max_rel, ok)


def _run_both(model: nn.Module, session: Any, inputs: tuple[torch.Tensor, ...], names: list[str],
              batch: int) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    with torch.no_grad():
        outputs = model(*inputs)
    torch_out = [t.detach().cpu().numpy() for t in tree_leaves(outputs) if isinstance(t, torch.Tensor)]
    session_inputs = [i.name for i in session.get_inputs()]
    by_name = dict(zip(names, inputs))
    if all(n in by_name for n in session_inputs):
        feed = {n: by_name[n].cpu().numpy() for n in session_inputs}
    else:
        feed = {n: t.cpu().numpy() for n, t in zip(session_inputs, inputs)}
    try:
        onnx_out = session.run(None, feed)
    except Exception as err:
        raise ExportError(
            f"ONNX parity: onnxruntime failed at batch size {batch} ({_first_line(err)}). If the batch "
            "dimension is static, export with dynamic_batch=True."
        ) from err
    if len(onnx_out) != len(torch_out):
        raise ExportError(
            f"ONNX parity: the ONNX model has {len(onnx_out)} outputs, PyTorch {len(torch_out)}.")
    return onnx_out, torch_out, [o.name for o in session.get_outputs()]


def onnx_parity(
    model: nn.Module,
    example_inputs: Any,
    onnx_model_or_path: onnx.ModelProto | str | os.PathLike,
    *,
    batch_sizes: Sequence[int] = (1, 3),
    atol: float = 1e-4,
    rtol: float = 1e-3,
    seed: int = 0,
) -> ParityResult:
    """Compare ONNX Runtime (CPU) with PyTorch (eval, no_grad) on random inputs.

    Inputs are drawn like the examples (floats ~ N(0, 1); integers and bools within the example's
    min..max range, so token ids stay in the vocabulary) with dim 0 set to each batch size.

    Args:
        model: the PyTorch model that was exported.
        example_inputs: inputs as given to :func:`export_onnx`.
        onnx_model_or_path: the exported ``onnx.ModelProto`` or a path to the ``.onnx`` file.
        batch_sizes: batch sizes to try; include one other than the example's to exercise a dynamic batch.
        atol: absolute tolerance, for outputs whose largest magnitude is at most 1 and scaled by it
            above; rtol: relative tolerance (elementwise ``|a-b| <= atol * max(1, max|b|) + rtol*|b|``).
        seed: seed of the random inputs.

    Returns:
        A :class:`ParityResult` with per-output, per-batch-size errors and ``ok``.

    Raises:
        ExportError: onnxruntime cannot load or run the model, or the output counts differ.
    """
    inputs, names = _positional_inputs(model, example_inputs)
    session = _session(onnx_model_or_path)
    gen = torch.Generator().manual_seed(seed)
    checks: list[OutputParity] = []
    with _eval_mode(model):
        for batch in batch_sizes:
            batch_inputs = tuple(_random_like(t, int(batch), gen) for t in inputs)
            onnx_out, torch_out, out_names = _run_both(model, session, batch_inputs, names, int(batch))
            for name, got, want in zip(out_names, onnx_out, torch_out):
                checks.append(_compare(name, int(batch), np.asarray(got), want, atol, rtol))
    result = ParityResult(all(c.ok for c in checks), atol, rtol, tuple(int(b) for b in batch_sizes), checks)
    logger.info("%s", result.summary())
    return result


def assert_onnx_parity(
    model: nn.Module,
    example_inputs: Any,
    onnx_model_or_path: onnx.ModelProto | str | os.PathLike,
    **kwargs: Any,
) -> ParityResult:
    """:func:`onnx_parity`, raising :class:`ExportError` with the numbers when outputs differ.

    Raises:
        ExportError: an output differs beyond the tolerances (or onnxruntime failed).
    """
    result = onnx_parity(model, example_inputs, onnx_model_or_path, **kwargs)
    if not result.ok:
        raise ExportError(
            f"ONNX Runtime outputs of {_model_name(model)} differ from PyTorch.\n{result.summary()}\n"
            "Check for ops the exporter translates differently (e.g. in-place updates, data-dependent "
            "shapes) "
            "or loosen atol/rtol if the differences are rounding."
        )
    return result
