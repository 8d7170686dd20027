"""Capture with ``torch.export`` (non-strict) for models torch.fx cannot trace.

Hugging Face transformers >= 5 (BERT, ViT, DeiT ...) and models with data-dependent Python control
flow do not trace with ``torch.fx.symbolic_trace``. ``torch.export`` runs the real Python code on
fake tensors instead and records an ATen-level graph (the pre-dispatch "training" IR: ``aten.linear``,
``aten.layer_norm``, ``aten.scaled_dot_product_attention``, views with symbolic sizes ...).

:func:`capture_export` turns that program into a ``torch.fx.GraphModule`` that fxprune can analyse
and rewrite and that behaves like a model, not like a trace:

* **Dynamic sizes.** Dim 0 of every tensor input (the batch) and its size dims
  (``dynamic_sizes.size_roles``: dim 1 of 2-D integer/bool inputs, the token sequence; height and
  width of images; the time dim of audio) are exported as ``Dim.AUTO``: dynamic where the model
  allows it, specialised (with a capture note) where it does not. A dynamic dim whose example size
  is 1 is widened to 2 for the export only, so it is not specialised to 1. With image/audio sizes,
  shapes are reasoned about size-obliviously with guards deferred (minutes -> seconds on windowed
  attention) and ``int()`` in the model's own code keeps sizes symbolic; if that export fails, the
  batch and sequence alone are dynamic (noted). A symbolic size dim is then *checked*
  (``dynamic_sizes.settle_sizes``): the graph must reproduce the model at other sizes the model
  accepts, else the model is captured again at an irregular size (where size-dependent branches
  take their general path: pad-and-crop, interpolate), else the dim stays fixed with a note. View/
  reshape sizes are computed from the inputs (``x.size(0)``), so the captured model runs at any
  batch size and accepted size. Shape guards and the runtime asserts torch.export adds
  (``_guards_fn``, ``_assert_scalar``, ``_assert_tensor_metadata``) are removed.
* **Run-time sizes in torch form.** ``aten.sym_size.int(x, d)`` becomes ``x.size(d)`` and ATen calls
  that take such sizes (``view``, ``reshape``, ``expand``, ``slice``, ``arange``, ``new_ones`` ...)
  become their torch-level forms (``x.view([n, l, -1, 64])``, ``x[:, :l]``, ``torch.arange(l)``):
  ATen schema parsing rejects the traced sizes of TorchScript tracing, so only these forms export
  to ONNX with the fast TorchScript exporter and keep batch and sequence symbolic. Every other op
  stays an ATen call. ``aten.__and__`` / ``__or__`` / ``__xor__`` become ``aten.bitwise_*`` (the same
  kernels under public names).
* **Layers become modules again.** ``aten.linear`` / ``aten.conv{1,2,3}d`` / ``aten.layer_norm`` /
  ``aten.group_norm`` / ``aten.batch_norm`` / ``aten.embedding`` on parameters of one owner become
  ``call_module`` nodes of ``nn.Linear`` / ``nn.Conv*d`` / ``nn.LayerNorm`` / ``nn.GroupNorm`` /
  ``nn.BatchNorm*d`` / ``nn.Embedding`` at the owner's path (``encoder.layer.0.attention.self.query``),
  sharing the original ``Parameter`` objects, so names, ``state_dict`` keys and tied weights are
  unchanged and the module rules (and BatchNorm's train-mode statistics) apply. Anything else
  (a linear on a computed weight, parameters spread over owners) stays an ATen call, which has its
  own rules in :mod:`fxprune.opset.aten`.
* **train()/eval().** The program is captured in eval mode, so ``aten.dropout(x, p, False)`` froze
  ``train=False``. Each becomes an ``nn.Dropout(p)`` module (at the path of the ``nn.Dropout`` that
  called it when there was one): dropout follows ``model.train()`` / ``model.eval()`` again.
  Dropout *inside* ``scaled_dot_product_attention`` (``dropout_p``) was already 0.0 in the eval
  capture (transformers passes ``0.0 if not self.training``) and stays 0.0: the captured model does
  not drop attention probabilities in train mode. BatchNorm modules update their statistics in
  train mode.
* **Devices.** ``device=cpu`` constants recorded at capture (``arange``, ``to``) are replaced by the
  device of the first input, so the model moves to another device with ``.to()``.
* **Inputs and outputs** keep the model's calling convention: the forward takes the example inputs'
  names (``forward(input_ids, attention_mask)``, positionally or by keyword) and returns the
  original output structure (a transformers ``ModelOutput``, a tuple, a tensor ...) through the
  pytree code generator of ``torch.fx``.
* **Meta.** Node meta is reduced to ``nn_module_stack`` and ``stack_trace`` (fake tensors are
  dropped), so the module deep-copies, saves and loads cheaply.

``leaf_modules`` do not apply to this path: torch.export always records the ATen ops inside.
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
import logging
import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx
import torch.nn as nn

from fxprune._probe import bind_tensors, follow_dtypes, make_probe, no_stack_traces
from fxprune.errors import TraceError

__all__ = ["capture_export", "dynamic_dims", "META_DYNAMIC_DIMS"]

logger = logging.getLogger(__name__)

aten = torch.ops.aten

#: ``gm.meta`` key: ``{input name: [dims that are dynamic in the captured graph]}``.
META_DYNAMIC_DIMS = "fxprune.dynamic_dims"

_KEEP_META = ("nn_module_stack", "stack_trace")


# ------------------------------------------------------------------------------ entry point

def capture_export(model: nn.Module, args: tuple, kwargs: dict,
                   notes: list[str] | None = None, dynamic: bool = True,
                   size_dims: Sequence[Sequence[int]] | None = None) -> torch.fx.GraphModule:
    """Capture ``model`` (a private copy, in eval mode) with ``torch.export`` as a ``GraphModule``.

    Args:
        model: the module to capture (capture() passes its deep copy).
        args / kwargs: example inputs (tensors).
        notes: capture notes are appended here (dims that could not be dynamic, layers kept as
            ATen calls).
        dynamic: export batch/sequence dims as dynamic (the default). ``False`` captures static
            shapes, several times faster: enough for counting and planning, where no model is built.
        size_dims: the size dims of each input (args, then kwargs), when the caller knows them
            (a module inside a model, whose inputs need not follow the image/sequence layouts
            ``dynamic_sizes.size_roles`` assumes: TinyViT's blocks take ``[B, H, W, C]``). They
            are exported as dynamic with the batch dim and not probed again (the caller checks).

    Raises:
        TraceError: torch.export failed; the message gives torch.export's reason and what to do.
    """
    notes = notes if notes is not None else []
    names = _input_names(model, args, kwargs)
    examples = list(args) + list(kwargs.values())
    if size_dims is not None:
        specs = [{d: torch.export.Dim.AUTO for d in sorted({0, *dims}) if d < t.dim()}
                 for t, dims in zip(examples, size_dims)]
        return _capture_once(model, args, kwargs, names, specs, notes)[0]
    specs = [_dynamic_spec(t) if dynamic else {} for t in examples]
    out, dyn = _capture_once(model, args, kwargs, names, specs, notes)
    if not dynamic or _weightless(model):
        # static capture (counting, planning), or no weights to run the model at other sizes with
        return out
    # size dims (sequence, height/width, time): symbolic is not proof, probe them (dynamic_sizes)
    from fxprune.dynamic_sizes import META_SIZE_PROBE, settle_sizes, size_roles

    n_args = len(args)
    symbolic = {i: [d for d in dyn.get(names[i], []) if d in size_roles(t)] for i, t in enumerate(examples)}

    def recapture(inputs):
        return _capture_once(model, tuple(inputs[:n_args]), dict(zip(kwargs, inputs[n_args:])), names, specs,
                             [])[0]

    out, sized, probes = settle_sizes(model, out, examples, names, n_args, symbolic, notes, recapture)
    out.meta[META_DYNAMIC_DIMS] = {names[i]: sorted(set([d for d in dyn.get(names[i], []) if d == 0]
                                                        + sized.get(i, [])))
                                   for i in range(len(examples))}
    out.meta[META_SIZE_PROBE] = {names[i]: p for i, p in probes.items()}
    return out


def _weightless(model: nn.Module) -> bool:
    return any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def _capture_once(model, args, kwargs, names, specs, notes) -> tuple[torch.fx.GraphModule, dict[str, list[int]]]:
    """One torch.export capture turned into fxprune's graph module, and its symbolic dims per input."""
    with no_stack_traces():  # scale: fxprune never reads them, and they cost a quarter of the export
        probe, program = _export_probe(model, args, kwargs, names, specs, notes)  # scale: weightless capture
        if program is None:
            program = _export(model, args, kwargs, names, specs, notes)
    gm = program.module(check_guards=False) if _has_check_guards() else program.module()
    dyn = _record_dynamic(gm, names, specs, args, kwargs, notes)
    _drop_guards_and_asserts(gm)
    _inline_grad_blocks(gm)
    _sym_size_to_method(gm)
    _symbolic_sizes_to_torch(gm)
    _dunder_ops_to_named(gm)
    _histc_on_floats(gm)
    _live_devices(gm, *((probe.args, probe.kwargs) if probe is not None else (args, kwargs)))
    converted, kept = _layers_to_modules(gm)
    if probe is not None:  # scale: dtype arguments follow the weights; the model's tensors are bound
        follow_dtypes(gm, probe)
        bind_tensors(gm, probe, _tensor_device(model, args, kwargs))
    _strip_meta(gm)
    if kept:
        notes.append("layers kept as ATen calls (their parameters are not owned by one module): "
                     + ", ".join(sorted(kept))[:300])
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    out = torch.fx.GraphModule(gm, gm.graph, type(model).__name__)
    out.meta[META_DYNAMIC_DIMS] = dyn
    out.eval()
    logger.debug("torch.export capture of %s: %d layers turned into modules", type(model).__name__, converted)
    return out, dyn


def dynamic_dims(gm: torch.fx.GraphModule) -> dict[str, list[int]]:
    """The dims of each input that are dynamic in a graph captured by :func:`capture_export`."""
    return dict(gm.meta.get(META_DYNAMIC_DIMS, {}))


# ------------------------------------------------------------------------------- torch.export

def _export_probe(model, args, kwargs, names, specs, notes):
    """``torch.export`` on the weightless probe of ``fxprune._probe``: ``(probe, program)``, or
    ``(None, None)`` when the probe cannot be exported (the caller exports the real model, and a
    note says that dtype casts stay as recorded). A model whose weights are on the meta device has
    no real fallback: its export error is raised."""
    probe = make_probe(model, args, kwargs)
    probe_notes: list[str] = []
    try:
        program = _export(probe.model, probe.args, probe.kwargs, names, specs, probe_notes)
    except TraceError as err:
        if probe.weightless:
            raise
        logger.debug("weightless capture of %s failed: %s", type(model).__name__, err)
        notes.append(f"captured on the model's real tensors: the weightless (meta-device) capture failed "
                     f"({_first_line(err.__cause__ or err)}); dtype arguments recorded at capture stay "
                     "fixed, so the pruned model may not follow .to(dtype)")
        return None, None
    notes.extend(probe_notes)
    return probe, program


def _tensor_device(model: nn.Module, args: tuple, kwargs: dict) -> torch.device | None:
    """The device of the model's first non-meta tensor, else of the first non-meta input."""
    for t in list(model.parameters()) + list(model.buffers()) + list(args) + list(kwargs.values()):
        if isinstance(t, torch.Tensor) and not t.is_meta:
            return t.device
    return None


def _has_check_guards() -> bool:
    try:
        return "check_guards" in inspect.signature(torch.export.ExportedProgram.module).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def _input_names(model: nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """A name per example input: the forward parameter it binds to (``input_0``... when unknown)."""
    names = [f"input_{i}" for i in range(len(args))] + list(kwargs)
    try:
        params = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return names
    for i in range(min(len(args), len(params))):
        names[i] = params[i].name
    return names


def _dynamic_spec(t: torch.Tensor) -> dict[int, Any]:
    """Batch dim of every input, plus its size dims (``dynamic_sizes.size_roles``: token sequence,
    image height/width, audio time)."""
    from fxprune.dynamic_sizes import size_roles

    spec: dict[int, Any] = {}
    if t.dim() >= 1:
        spec[0] = torch.export.Dim.AUTO
    for d in size_roles(t):
        spec[d] = torch.export.Dim.AUTO
    return spec


def _batch_and_sequence(spec: dict[int, Any], t: torch.Tensor) -> dict[int, Any]:
    """``spec`` without the image/audio size dims (the fallback when those make torch.export fail)."""
    from fxprune.dynamic_sizes import size_roles

    roles = size_roles(t)
    return {d: v for d, v in spec.items() if d == 0 or roles.get(d) == "sequence"}


def _widen(t: torch.Tensor, spec: dict[int, Any]) -> torch.Tensor:
    """Repeat size-1 dynamic dims to 2: torch.export specialises sizes 0 and 1."""
    for d in spec:
        if t.shape[d] == 1:
            t = torch.cat([t, t], dim=d)
    return t


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:400] if text else type(err).__name__


def _export(model, args, kwargs, names, specs, notes):
    n_args = len(args)
    examples = list(args) + list(kwargs.values())
    narrow = [_batch_and_sequence(s, t) for s, t in zip(specs, examples)]
    attempts = [("dynamic", specs)]
    if narrow != specs:
        attempts.append(("batch/sequence", narrow))
    attempts.append(("static", None))
    errors = []
    for label, spec_list in attempts:
        sized = label == "dynamic" and narrow != specs
        if spec_list is not None:
            ex = [_widen(t, s) for t, s in zip(examples, spec_list)]
            shapes_list = [s or None for s in spec_list]
        else:
            ex = list(examples)
            shapes_list = [None] * len(ex)
        ex_args, ex_kwargs = tuple(ex[:n_args]), dict(zip(kwargs, ex[n_args:]))
        dynamic_shapes = (_shapes_structure(model, n_args, list(kwargs), shapes_list)
                          if spec_list is not None else None)
        try:
            with _size_oblivious(sized), _symbolic_int(model, sized):
                program = torch.export.export(model, ex_args, ex_kwargs, dynamic_shapes=dynamic_shapes,
                                              strict=False, **_deferred_asserts(sized))
        except Exception as err:  # torch.export raises many types (UserError, data-dependent guards...)
            errors.append((label, err))
            logger.debug("torch.export (%s) of %s failed: %s", label, type(model).__name__, err)
            continue
        if errors and label == "static":
            notes.append(f"torch.export with dynamic batch/sequence dims failed "
                         f"({_first_line(errors[0][1])}); captured with static shapes: the model only runs "
                         "at the example input shapes")
        elif errors:
            notes.append(f"torch.export with dynamic image/audio sizes failed ({_first_line(errors[0][1])}); "
                         "captured with dynamic batch and sequence only: image and audio sizes are fixed")
        return program
    label, err = errors[0]
    raise TraceError(
        f"torch.export could not capture {type(model).__name__}: {type(err).__name__}: {_first_line(err)}. "
        "What you can do: check that example_inputs match the forward signature (names, dtypes, shapes); "
        "replace data-dependent Python control flow with torch.where/torch.cond; or register the "
        "offending module as a custom op. Run torch.export.export(model, args, kwargs, strict=False) "
        "yourself to see the full trace.",
        construct=f"torch.export: {type(err).__name__}",
    ) from err


def _size_oblivious(on: bool):
    """Symbolic image/audio sizes: reason about them size-obliviously (sizes >= 2).

    With plain backed symbols, torch.export's shape reasoning on windowed attention (Swin's pad,
    partition and reverse views over ``H // window``) proves numel equalities through nested floor
    divisions: minutes per block. Size-oblivious reasoning with guards deferred to runtime asserts
    captures the same graph in seconds; fxprune drops those asserts and instead checks the graph
    against the model at other sizes (``dynamic_sizes.settle_sizes``).
    """
    if not on:
        return contextlib.nullcontext()
    try:
        import torch.fx.experimental._config as fx_config

        return fx_config.patch(backed_size_oblivious=True)
    except Exception:  # pragma: no cover - an older torch without the option
        return contextlib.nullcontext()


class _SymbolicIntMeta(type):
    def __call__(cls, *args, **kwargs):
        if len(args) == 1 and not kwargs:
            x = args[0]
            if isinstance(x, torch.SymInt):
                return x
            if isinstance(x, torch.SymFloat):
                return torch.sym_int(x)
        return builtins.int(*args, **kwargs)

    def __instancecheck__(cls, obj):  # isinstance(n, int) in model code keeps working
        return isinstance(obj, (builtins.int, torch.SymInt))

    def __subclasscheck__(cls, sub):
        return issubclass(sub, (builtins.int, torch.SymInt))

    def __getattr__(cls, name):  # int.from_bytes, int.bit_length ...
        return getattr(builtins.int, name)


class _SymbolicInt(metaclass=_SymbolicIntMeta):
    """``int`` for model code during a capture with symbolic sizes: a symbolic size stays symbolic.

    Model code rounds sizes with ``int(...)`` (HF MobileViT: ``int(math.ceil(h / p) * p)``), and
    ``int()`` of a symbolic size fixes it to the example's value, so the patch grid of every
    MobileViT block would be frozen to the example image. Inside the model's own modules ``int``
    returns a symbolic integer unchanged (a symbolic float is truncated symbolically); anything
    that really needs a Python int (``range``, list indices) still asks for one and specialises
    there. torch.export itself patches ``min``/``max`` the same way in non-strict mode.
    """


@contextlib.contextmanager
def _symbolic_int(model: nn.Module, on: bool):
    """Patch ``int`` in the globals of the modules that define the model's layers (see _SymbolicInt)."""
    if not on:
        yield
        return
    import sys

    names = {type(m).__module__ for m in model.modules()}
    patched = []
    shim = _SymbolicInt
    for name in sorted(names):
        mod = sys.modules.get(name)
        if mod is None or name.startswith(("torch.", "fxprune.")) or name == "torch":
            continue
        patched.append((mod, "int" in mod.__dict__, mod.__dict__.get("int")))
        mod.__dict__["int"] = shim
    try:
        yield
    finally:
        for mod, had, old in patched:
            if had:
                mod.__dict__["int"] = old
            else:
                mod.__dict__.pop("int", None)


def _deferred_asserts(on: bool) -> dict[str, bool]:
    try:
        ok = "prefer_deferred_runtime_asserts_over_guards" in inspect.signature(torch.export.export).parameters
    except (TypeError, ValueError):  # pragma: no cover
        ok = False
    return {"prefer_deferred_runtime_asserts_over_guards": True} if on and ok else {}


def _shapes_structure(model, n_args: int, kw_names: list[str], specs: list) -> Any:
    """``dynamic_shapes`` in the structure torch.export wants: by parameter name when possible."""
    if not kw_names:
        return tuple(specs)
    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind_partial(*[object()] * n_args, **{k: object() for k in kw_names})
    except (TypeError, ValueError):
        return tuple(specs)
    out: dict[str, Any] = {}
    names = list(bound.arguments)
    flat = iter(specs)
    for name in names:
        param = sig.parameters[name]
        if param.kind is param.VAR_POSITIONAL:
            out[name] = tuple(next(flat) for _ in bound.arguments[name])
        elif param.kind is param.VAR_KEYWORD:
            out[name] = {k: next(flat) for k in bound.arguments[name]}
        else:
            out[name] = next(flat)
    return out


def _record_dynamic(gm, names, specs, args, kwargs, notes) -> dict[str, list[int]]:
    """Which requested dynamic dims are symbolic in the exported graph (and notes for the others)."""
    from fxprune.dynamic_sizes import size_roles

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out: dict[str, list[int]] = {}
    examples = list(args) + list(kwargs.values())
    for i, (node, spec) in enumerate(zip(placeholders, specs)):
        name = names[i] if i < len(names) else node.name
        val = node.meta.get("val")
        roles = size_roles(examples[i])
        dyn, static = [], []
        for d in spec:
            size = val.shape[d] if val is not None and d < val.dim() else None
            if size is not None and not isinstance(size, int):
                dyn.append(d)
            else:
                static.append(d)
        # a 3-D float input names two candidate time dims: the other one being static is expected
        either = examples[i].dim() == 3 and examples[i].is_floating_point() and any(d in roles for d in dyn)
        for d in static:
            if either and d in roles:
                continue
            what = "batch" if d == 0 else roles.get(d, "size")
            notes.append(f"input {name!r} dim {d} ({what}) is static ({examples[i].shape[d]}) in the "
                         "captured graph: the model specialises it")
        out[name] = dyn
    return out


# ------------------------------------------------------------------------------ graph fixes

def _strip_meta(gm: torch.fx.GraphModule) -> None:
    """Keep the module stack and stack trace; drop fake tensors and export bookkeeping."""
    for node in gm.graph.nodes:
        keep = {k: node.meta[k] for k in _KEEP_META if k in node.meta}
        node.meta.clear()
        node.meta.update(keep)
    gm.meta.clear()


_ASSERTS = tuple(
    op for op in (
        getattr(aten, "_assert_tensor_metadata", None),
        getattr(aten, "_assert_scalar", None),
        getattr(aten, "_assert_async", None),
        getattr(aten, "sym_constrain_range", None),
        getattr(aten, "sym_constrain_range_for_size", None),
        getattr(aten, "_functional_assert_async", None),
    ) if op is not None
)


def _is_assert(node: torch.fx.Node) -> bool:
    t = node.target
    packet = getattr(t, "overloadpacket", t)
    return node.op == "call_function" and packet in _ASSERTS


def _drop_guards_and_asserts(gm: torch.fx.GraphModule) -> None:
    """Remove the input-shape guard module and runtime asserts (they pin example-time facts)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            target = str(node.target)
            graph.erase_node(node)
            if hasattr(gm, target):
                delattr(gm, target)
        elif _is_assert(node) and not node.users:
            graph.erase_node(node)
    # the scalar expressions that only fed the asserts are dead now
    graph.eliminate_dead_code()


def _sym_size_to_method(gm: torch.fx.GraphModule) -> None:
    """``aten.sym_size.int(x, d)`` -> ``x.size(d)`` (traced as a dynamic size by every exporter)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is aten.sym_size.int:
            with graph.inserting_before(node):
                new = graph.call_method("size", (node.args[0], node.args[1]))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)


def _int_valued(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """Nodes that compute Python ints from tensor sizes (``x.size(1)``, ``x.size(0) * 12``)."""
    out: set[torch.fx.Node] = set()
    for n in graph.nodes:
        if n.op == "call_method" and n.target == "size" and len(n.args) == 2:
            out.add(n)
        elif n.op == "call_function" and any(a in out for a in n.all_input_nodes):
            mod = getattr(n.target, "__module__", "") or ""
            name = getattr(n.target, "__name__", "") or ""
            if mod in ("_operator", "operator", "math") or name.startswith("sym_"):
                out.add(n)
    return out


def _no_pin(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items()
            if k != "pin_memory" and not (k == "layout" and v == torch.strided)}


def _slice_to_getitem(x, dim=0, start=None, end=None, step=1):
    sl = slice(start, end, None if step == 1 else step)
    if dim >= 0:
        index = (slice(None),) * dim + (sl,)
    else:
        index = (Ellipsis, sl) + (slice(None),) * (-dim - 1)
    return ("call_function", operator.getitem, (x, index), {})


# ATen op -> torch-level call, for ATen calls that take sizes computed at run time. Their schema
# parsers reject the traced sizes of TorchScript tracing, so the TorchScript ONNX exporter (the fast
# one) could not export them; the torch-level forms record dynamic sizes everywhere.
_TORCH_FORMS: dict[str, Callable[..., tuple]] = {
    "view": lambda x, size: ("call_method", "view", (x, list(size)), {}),
    "_unsafe_view": lambda x, size: ("call_method", "reshape", (x, list(size)), {}),
    "reshape": lambda x, shape: ("call_method", "reshape", (x, list(shape)), {}),
    "expand": lambda x, size, implicit=False: ("call_method", "expand", (x, list(size)), {}),
    "repeat": lambda x, repeats: ("call_method", "repeat", (x, list(repeats)), {}),
    "slice": _slice_to_getitem,
    "select": lambda x, dim, index: ("call_function", torch.select, (x, dim, index), {}),
    "narrow": lambda x, dim, start, n: ("call_function", torch.narrow, (x, dim, start, n), {}),
    "unflatten": lambda x, dim, sizes: ("call_function", torch.unflatten, (x, dim, tuple(sizes)), {}),
    "split": lambda x, size, dim=0: ("call_function", torch.split, (x, size, dim), {}),
    "arange": lambda *a, **k: ("call_function", torch.arange, a, _no_pin(k)),
    "full": lambda *a, **k: ("call_function", torch.full, a, _no_pin(k)),
    "zeros": lambda *a, **k: ("call_function", torch.zeros, a, _no_pin(k)),
    "ones": lambda *a, **k: ("call_function", torch.ones, a, _no_pin(k)),
    "empty": lambda *a, **k: ("call_function", torch.empty, a, _no_pin(k)),
    "new_ones": lambda x, *a, **k: ("call_method", "new_ones", (x, *a), _no_pin(k)),
    "new_zeros": lambda x, *a, **k: ("call_method", "new_zeros", (x, *a), _no_pin(k)),
    "new_full": lambda x, *a, **k: ("call_method", "new_full", (x, *a), _no_pin(k)),
    "new_empty": lambda x, *a, **k: ("call_method", "new_empty", (x, *a), _no_pin(k)),
    # symbolic image sizes reach padding amounts and scalar operands (Swin pads its windows by
    # ``(w - W % w) % w`` and masks them with ``arange(Hp) >= Hp - w``)
    "pad": lambda x, pad, mode="constant", value=None: (
        "call_function", torch.nn.functional.pad, (x, list(pad), mode, value), {}),
    "constant_pad_nd": lambda x, pad, value=0: (
        "call_function", torch.nn.functional.pad, (x, list(pad), "constant", value), {}),
}


def _interpolate_form(mode: str, antialias: bool = False):
    """``aten.upsample_*(x, output_size, [align_corners,] ...)`` with a run-time size -> ``F.interpolate``
    (DINOv2 and MobileViT resize position tables and patch grids to the input's size)."""
    def form(x, size, *rest, **kw):
        if size is None or not isinstance(size, (list, tuple)):
            raise TypeError("scale factors only")
        align = rest[0] if rest and isinstance(rest[0], bool) else kw.get("align_corners")
        kwargs = {"size": list(size), "mode": mode}
        if mode in ("linear", "bilinear", "bicubic", "trilinear"):
            kwargs["align_corners"] = bool(align)
        if antialias:
            kwargs["antialias"] = True
        return ("call_function", torch.nn.functional.interpolate, (x,), kwargs)
    return form


for _name, _mode, _aa in (("upsample_bicubic2d", "bicubic", False), ("upsample_bilinear2d", "bilinear", False),
                          ("_upsample_bilinear2d_aa", "bilinear", True), ("upsample_nearest2d", "nearest", False),
                          ("upsample_nearest1d", "nearest", False), ("upsample_linear1d", "linear", False),
                          ("_upsample_nearest_exact2d", "nearest-exact", False),
                          ("upsample_nearest3d", "nearest", False), ("upsample_trilinear3d", "trilinear", False)):
    _TORCH_FORMS[_name] = _interpolate_form(_mode, _aa)

# tensor-scalar arithmetic and comparisons with a run-time size: ``torch.ge(x, n)``
for _name in ("add", "sub", "mul", "div", "remainder", "fmod", "pow",
              "eq", "ne", "ge", "gt", "le", "lt", "minimum", "maximum", "clamp", "clamp_min", "clamp_max"):
    if hasattr(torch, _name):
        _TORCH_FORMS.setdefault(
            _name, (lambda fn: lambda *a, **k: ("call_function", fn, a, k))(getattr(torch, _name)))


def _symbolic_sizes_to_torch(gm: torch.fx.GraphModule) -> int:
    """ATen calls with run-time sizes -> their torch-level forms (``x.view(n, l, -1, 64)``...)."""
    graph = gm.graph
    ints = _int_valued(graph)
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if not any(a in ints for a in node.all_input_nodes):
            continue
        form = _TORCH_FORMS.get(node.target.overloadpacket.__name__)
        if form is None:
            continue
        try:
            op, target, args, kwargs = form(*node.args, **node.kwargs)
        except TypeError:
            continue  # an overload with other arguments: keep the ATen call
        with graph.inserting_before(node):
            new = graph.create_node(op, target, tuple(args), dict(kwargs))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        count += 1
    return count


_DUNDER_OPS = {"__and__": "bitwise_and", "__or__": "bitwise_or", "__xor__": "bitwise_xor",
               "__lshift__": "bitwise_left_shift", "__rshift__": "bitwise_right_shift"}


def _dunder_ops_to_named(gm: torch.fx.GraphModule) -> int:
    """``aten.__and__.Tensor`` -> ``aten.bitwise_and.Tensor`` (same kernel, a plain public name)."""
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        named = _DUNDER_OPS.get(node.target.overloadpacket.__name__)
        overload = getattr(getattr(aten, named, None), node.target._overloadname, None) if named else None
        if overload is not None:
            node.target = overload
            count += 1
    return count


def _inline_grad_blocks(gm: torch.fx.GraphModule) -> int:
    """Inline the subgraphs of ``wrap_with_set_grad_enabled`` (a ``with torch.no_grad():`` block in
    the model's code) into the graph, so every pass sees their ops (device and dtype constants,
    layers) like any other. The outputs of a ``no_grad`` block are detached, which is what the block
    gives: the same values, no gradient through them."""
    hop = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
    count = 0
    for node in list(gm.graph.nodes):
        if hop is None or node.op != "call_function" or node.target is not hop:
            continue
        enabled, sub_node, *operands = node.args
        if not isinstance(sub_node, torch.fx.Node) or sub_node.op != "get_attr":
            continue
        sub = gm.get_submodule(str(sub_node.target))
        if not isinstance(sub, torch.fx.GraphModule):
            continue
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(operands):
            continue
        val_map = dict(zip(placeholders, operands))
        with gm.graph.inserting_before(node):
            outputs = gm.graph.graph_copy(sub.graph, val_map)
            for orig, new in val_map.items():
                if orig.op == "get_attr":  # the subgraph's own constants stay on it, under its path
                    new.target = f"{sub_node.target}.{orig.target}"
            outs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
            if not enabled:
                outs = [gm.graph.call_function(torch.ops.aten.detach.default, (o,))
                        if isinstance(o, torch.fx.Node) and isinstance(o.meta.get("val"), torch.Tensor) else o
                        for o in outs]
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int):
                user.replace_all_uses_with(outs[user.args[1]])
                gm.graph.erase_node(user)
        if node.users:
            raise TraceError(f"torch.export captured a grad-mode block ({node.name}) fxprune cannot inline: its "
                             "outputs are used as a whole")
        gm.graph.erase_node(node)
        if not sub_node.users:
            gm.graph.erase_node(sub_node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def _histc_on_floats(gm: torch.fx.GraphModule) -> int:
    """``histc(x)`` of an integer ``x`` -> ``histc(x.float()).to(x.dtype)``.

    Code that picks the dtype by device (transformers' mixture-of-experts counts tokens per expert
    with ``histc`` on integers except on CPU, where the kernel takes floats only) takes the non-CPU
    branch on the weightless (meta-device) capture. Float ``histc`` counts integers exactly (below
    2**24) on every device, so the graph runs on CPU and GPU alike."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or getattr(node.target, "overloadpacket", None) is not aten.histc:
            continue
        src = node.args[0] if node.args else None
        val = src.meta.get("val") if isinstance(src, torch.fx.Node) else None
        if not isinstance(val, torch.Tensor) or val.dtype.is_floating_point:
            continue
        with gm.graph.inserting_before(node):
            as_float = gm.graph.call_function(aten.to.dtype, (src, torch.float32))
        node.replace_input_with(src, as_float)
        with gm.graph.inserting_after(node):
            back = gm.graph.call_function(aten.to.dtype, (node, val.dtype))
        node.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)
        count += 1
    return count


def _input_device(args: tuple, kwargs: dict) -> torch.device | None:
    for t in list(args) + list(kwargs.values()):
        if isinstance(t, torch.Tensor):
            return t.device
    return None


def _live_devices(gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> int:
    """Replace ``device=<capture device>`` constants by ``<first input>.device``."""
    device = _input_device(args, kwargs)
    if device is None:
        return 0
    graph = gm.graph
    anchor = next((n for n in graph.nodes if n.op == "placeholder"), None)
    if anchor is None:
        return 0
    dev_node = None
    count = 0

    def sub(value):
        nonlocal dev_node, count
        if isinstance(value, torch.device) and value == device:
            if dev_node is None:
                last_ph = [n for n in graph.nodes if n.op == "placeholder"][-1]
                with graph.inserting_after(last_ph):
                    dev_node = graph.call_function(getattr, (anchor, "device"))
            count += 1
            return dev_node
        if isinstance(value, (list, tuple)):
            return type(value)(sub(v) for v in value)
        return value

    for node in list(graph.nodes):
        if node.op != "call_function" or node is dev_node:
            continue
        node.args = tuple(sub(a) for a in node.args)
        node.kwargs = {k: sub(v) for k, v in node.kwargs.items()}
    return count


# ------------------------------------------------------------------------ layers to modules

def _attr_target(a: Any) -> str | None:
    return str(a.target) if isinstance(a, torch.fx.Node) and a.op == "get_attr" else None


def _owner(gm: torch.fx.GraphModule, refs: dict[str, Any]) -> str | None:
    """The module path that owns exactly the parameters in ``refs`` ({attr: get_attr node or None})."""
    prefix = None
    for attr, node in refs.items():
        if node is None:
            continue
        target = _attr_target(node)
        if target is None:
            return None
        path, _, name = target.rpartition(".")
        if name != attr or not path or (prefix is not None and path != prefix):
            return None
        prefix = path
    return prefix


def _tensor(gm, path, name):
    mod = gm.get_submodule(path)
    return getattr(mod, name, None)


def _replace_owner(gm: torch.fx.GraphModule, path: str, new: nn.Module,
                   names: tuple[str, ...]) -> nn.Module | None:
    """Put ``new`` at ``path``, moving the owner's parameters/buffers ``names`` into it (same objects)."""
    old = gm.get_submodule(path)
    if type(old) is type(new):  # the same layer called again (weight sharing)
        return old if old.extra_repr() == new.extra_repr() else None
    if type(old) is not nn.Module or old._modules:
        return None  # a real module (or a container with children) is already there
    extra = (set(old._parameters) | set(old._buffers)) - set(names)
    if extra:
        return None
    for n in names:
        if n in old._parameters:
            new._parameters[n] = old._parameters[n]
        elif n in old._buffers:
            new._buffers[n] = old._buffers[n]
            if n in old._non_persistent_buffers_set:
                new._non_persistent_buffers_set.add(n)
    new.train(old.training)
    parent_path, _, child = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    setattr(parent, child, new)
    return new


def _on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    with torch.device("meta"):
        return factory()


def _const(v: Any, default: Any) -> Any:
    return default if v is None else v


def _tup(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


_NO_PARAMS = "no parameters"  # a builder's answer for a layer call that has nothing to own


def _linear(node, gm):
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    path = _owner(gm, {"weight": w, "bias": b})
    if path is None:
        return None
    weight = _tensor(gm, path, "weight")
    if weight is None or weight.dim() != 2:
        return None
    new = _on_meta(lambda: nn.Linear(weight.shape[1], weight.shape[0], bias=b is not None))
    return path, new, ("weight", "bias") if b is not None else ("weight",), (x,)


def _conv(node, gm):
    a = list(node.args) + [None] * 7
    x, w, b, stride, padding, dilation, groups = a[:7]
    kw = node.kwargs
    b = kw.get("bias", b)
    path = _owner(gm, {"weight": w, "bias": b})
    if path is None:
        return None
    weight = _tensor(gm, path, "weight")
    if weight is None:
        return None
    nd = weight.dim() - 2
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}.get(nd)
    if cls is None:
        return None
    groups = int(_const(kw.get("groups", groups), 1))
    stride = _tup(_const(kw.get("stride", stride), 1))
    padding = _tup(_const(kw.get("padding", padding), 0))
    dilation = _tup(_const(kw.get("dilation", dilation), 1))
    new = _on_meta(lambda: cls(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                               stride=stride, padding=padding, dilation=dilation, groups=groups,
                               bias=b is not None))
    return path, new, ("weight", "bias") if b is not None else ("weight",), (x,)


def _layer_norm(node, gm):
    a = list(node.args) + [None] * 5
    x, shape, w, b, eps = a[:5]
    if w is None:
        return _NO_PARAMS  # no affine: nothing to own, the ATen call has its rule
    path = _owner(gm, {"weight": w, "bias": b})
    if path is None:
        return None
    eps = float(_const(eps, 1e-5))
    new = _on_meta(lambda: nn.LayerNorm(tuple(shape), eps=eps, elementwise_affine=True, bias=b is not None))
    return path, new, ("weight", "bias") if b is not None else ("weight",), (x,)


def _group_norm(node, gm):
    a = list(node.args) + [None] * 5
    x, groups, w, b, eps = a[:5]
    if w is None or b is None:
        return None
    path = _owner(gm, {"weight": w, "bias": b})
    if path is None:
        return None
    weight = _tensor(gm, path, "weight")
    eps = float(_const(eps, 1e-5))
    new = _on_meta(lambda: nn.GroupNorm(int(groups), weight.shape[0], eps=eps, affine=True))
    return path, new, ("weight", "bias"), (x,)


def _batch_norm(node, gm):
    a = list(node.args) + [None] * 9
    x, w, b, rm, rv, training, momentum, eps = a[:8]
    if training or rm is None or rv is None or (w is None) != (b is None):
        return None
    refs = {"running_mean": rm, "running_var": rv}
    if w is not None:
        refs.update(weight=w, bias=b)
    path = _owner(gm, refs)
    if path is None:
        return None
    mean = _tensor(gm, path, "running_mean")
    owner = gm.get_submodule(path)
    val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    ndim = val.dim() if isinstance(val, torch.Tensor) else None
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(ndim)
    if cls is None:
        return None
    new = _on_meta(lambda: cls(mean.shape[0], eps=float(_const(eps, 1e-5)), momentum=momentum,
                               affine=w is not None, track_running_stats=True))
    names = ("running_mean", "running_var") + (("weight", "bias") if w is not None else ())
    if "num_batches_tracked" in owner._buffers:
        names += ("num_batches_tracked",)
    else:
        new._buffers["num_batches_tracked"] = torch.tensor(0, dtype=torch.long, device=mean.device)
    return path, new, names, (x,)


def _embedding(node, gm):
    a = list(node.args) + [None] * 5
    w, idx, padding_idx, scale_grad, sparse = a[:5]
    path = _owner(gm, {"weight": w})
    if path is None:
        return None
    weight = _tensor(gm, path, "weight")
    if weight is None or weight.dim() != 2:
        return None
    pad = None if padding_idx is None or int(padding_idx) < 0 else int(padding_idx)
    new = _on_meta(lambda: nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=pad,
                                        scale_grad_by_freq=bool(scale_grad), sparse=bool(sparse)))
    return path, new, ("weight",), (idx,)


_LAYERS: dict[Any, Callable] = {
    aten.linear.default: _linear,
    aten.conv1d.default: _conv,
    aten.conv2d.default: _conv,
    aten.conv3d.default: _conv,
    aten.layer_norm.default: _layer_norm,
    aten.group_norm.default: _group_norm,
    aten.batch_norm.default: _batch_norm,
    aten.embedding.default: _embedding,
}
for _name in ("conv1d", "conv2d", "conv3d"):
    _pad = getattr(getattr(aten, _name), "padding", None)
    if _pad is not None:
        _LAYERS[_pad] = _conv


def _free_path(gm: torch.fx.GraphModule, path: str) -> str:
    """``path`` if nothing lives there yet, else ``path_1``, ``path_2``..."""
    def taken(p):
        try:
            gm.get_submodule(p)
            return True
        except AttributeError:
            parent, _, child = p.rpartition(".")
            try:
                owner = gm.get_submodule(parent) if parent else gm
            except AttributeError:
                return False
            return hasattr(owner, child)

    if not taken(path):
        return path
    i = 1
    while taken(f"{path}_{i}"):
        i += 1
    return f"{path}_{i}"


def _add_module(gm: torch.fx.GraphModule, path: str, module: nn.Module) -> None:
    parts = path.split(".")
    owner: nn.Module = gm
    for p in parts[:-1]:
        child = owner._modules.get(p)
        if child is None:
            child = nn.Module()
            owner.add_module(p, child)
        owner = child
    owner.add_module(parts[-1], module)


def _dropout_path(gm: torch.fx.GraphModule, node: torch.fx.Node, p: float, made: dict[str, float]) -> str:
    """Where the ``nn.Dropout`` for an ``aten.dropout`` call lives: the path of the ``nn.Dropout``
    module that made the call when there was one (``encoder.layer.0.output.dropout``), else
    ``<calling module>.dropout`` (suffixed ``_1``, ``_2``... when taken)."""
    stack = node.meta.get("nn_module_stack") or {}
    last = list(stack.values())[-1] if stack else None
    path, cls = last if isinstance(last, tuple) and len(last) == 2 else ("", "")
    cls_name = str(getattr(cls, "__name__", cls)).rsplit(".", 1)[-1]
    if path and "Dropout" in cls_name:
        if made.get(path) == p:
            return path  # the same dropout module called again
        base = path
    else:
        base = f"{path}.dropout" if path else "dropout"
    return _free_path(gm, base)


def _layers_to_modules(gm: torch.fx.GraphModule) -> tuple[int, set[str]]:
    """ATen layer calls on owned parameters -> call_module of real ``nn`` layers (see module doc)."""
    graph = gm.graph
    converted, kept = 0, set()
    made_dropout: dict[str, float] = {}
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.dropout.default:
            x, p = node.args[0], float(node.args[1])
            path = _dropout_path(gm, node, p, made_dropout)
            if path not in made_dropout:
                _add_module(gm, path, nn.Dropout(p))
                made_dropout[path] = p
            _swap(graph, node, path, (x,))
            converted += 1
            continue
        build = _LAYERS.get(node.target)
        if build is None:
            continue
        try:
            spec = build(node, gm)
        except Exception as err:  # unusual argument forms: keep the ATen call
            logger.debug("not converting %s: %s", node.name, err)
            spec = None
        if spec is _NO_PARAMS:
            continue
        if spec is None:
            kept.add(f"{node.target.overloadpacket.__name__} ({node.name})")
            continue
        path, new, names, call_args = spec
        module = _replace_owner(gm, path, new, names)
        if module is None:
            kept.add(f"{node.target.overloadpacket.__name__} ({node.name})")
            continue
        used = [a for a in node.all_input_nodes if a.op == "get_attr"]
        _swap(graph, node, path, call_args)
        for a in used:
            if not a.users:
                graph.erase_node(a)
        converted += 1
    return converted, kept


def _swap(graph: torch.fx.Graph, node: torch.fx.Node, path: str, args: tuple) -> None:
    with graph.inserting_before(node):
        new = graph.call_module(path, args)
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)

