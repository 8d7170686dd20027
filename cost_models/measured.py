"""Measured MACs: ``torch.utils.flop_counter``'s formulas, run on fake tensors, per fx node.

This is fxprune's *independent* MAC count. It knows nothing of the op rules in
``fxprune.opset``: it runs the graph (or any module) on meta tensors (the module's parameters and
buffers swapped for meta ones of the same shape for the run), so no real arithmetic happens and
the cost follows the graph, not the FLOPs, and reads every ATen op that
dispatches through the formulas of ``torch.utils.flop_counter`` (conv, mm/bmm/addmm/baddbmm,
fused attention...), plus the formulas that module lacks on CPU:

* ``_scaled_dot_product_flash_attention_for_cpu`` (the CPU SDPA kernel; torch counts it as 0,
  which is why ``FlopCounterMode`` undercounts transformers on CPU): QK^T + AV, as the math path;
* ``mkldnn_rnn_layer`` (LSTM on CPU): ``T*B*(W_ih + W_hh)`` per layer and direction;
* ``mv``/``addmv``/``dot``/``vdot`` and ``_trilinear`` (``nn.Bilinear``);
* grouped matmuls of mixture-of-experts layers (``_grouped_mm``, transformers' custom
  ``grouped_mm_fallback``): one dot product of length ``K`` per output element.

An ATen op whose name says it multiplies matrices (conv, mm, attention, rnn...) but that has no
formula is recorded per node as *unmeasured*: the count then cannot vouch for that node.

One MAC is half of the counter's FLOPs (``2 * M * N * K`` for a matmul).

Two entry points:

``measure_graph(gm, inputs)``
    MACs per fx node of a ``GraphModule`` (a leaf module's node carries everything inside it).
    A node that cannot run on meta tensors (``.item()``, ``nonzero``...) is run once on real
    tensors of the recorded shapes, and the interpretation continues on meta ones.
``measure_model(model, inputs)``
    MACs of one forward of any module (the pruned model, the user's original).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

__all__ = ["GraphMeasure", "measure_graph", "measure_model", "MacMeter", "FORMULAS", "formula_for", "grouped_mm_flops"]

logger = logging.getLogger(__name__)

aten = torch.ops.aten


def _shapes(f: Callable[..., int]) -> Callable[..., int]:
    """Wrap a formula over shapes into one over tensors (as ``flop_counter.shape_wrapper``)."""

    def get(x):
        return tuple(x.shape) if isinstance(x, torch.Tensor) else x

    def nf(*args, out_val=None, **kwargs):
        args, kwargs, out_shape = tree_map(get, (args, kwargs, out_val))
        return f(*args, out_shape=out_shape, **kwargs)

    return nf


def _sdpa_cpu(q, k, v, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(q, k, v)


def _mkldnn_rnn_layer(inp, w_ih, w_hh, *args, out_shape=None, **kwargs) -> int:
    steps = math.prod(inp) // inp[-1]  # T * B whatever the layout
    return 2 * steps * (math.prod(w_ih) + math.prod(w_hh))


def _mv(a, b, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(a)


def _addmv(bias, a, b, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(a)


def _dot(a, b, *args, out_shape=None, **kwargs) -> int:
    return 2 * math.prod(a)


def _trilinear(i1, i2, i3, expand1, expand2, expand3, sumdim, unroll_dim=1, *args, out_shape=None, **kwargs) -> int:
    # nn.Bilinear: _trilinear(x1[N,1,I1,1], W[1,O,I1,I2], x2[N,1,1,I2], sumdim=[2,3]): one MAC per
    # element of the broadcast product over the summed dims (the kernel contracts it as a bmm)
    dims = [max(a, b, c) for a, b, c in zip(_expand(i1, expand1), _expand(i2, expand2), _expand(i3, expand3))]
    return 2 * math.prod(dims)


def grouped_mm_flops(a, b, *args, out_shape=None, **kwargs) -> int:
    """Grouped matmuls (mixture-of-experts layers: ``aten._grouped_mm``, transformers'
    ``grouped_mm_fallback``): every output element is one dot product of length ``K``; rows
    ``[S, K]`` against experts ``[E, K, N]`` give ``2 * S * N * K``. With both operands 2-D the
    groups split ``K`` (an ``[E, M, N]`` output of ``E`` partial products): ``2 * M * N * K``."""
    k = a[-1]
    if len(a) == 2 and len(b) == 2 and len(out_shape) == 3:
        return 2 * out_shape[1] * out_shape[2] * k
    return 2 * math.prod(out_shape) * k


def _expand(shape, dims):
    s = list(shape)
    for d in sorted(dims):
        s.insert(d, 1)
    return s


def _formulas() -> dict[Any, Callable[..., int]]:
    from torch.utils.flop_counter import flop_registry

    table: dict[Any, Callable[..., int]] = dict(flop_registry)
    extra = {
        "_scaled_dot_product_flash_attention_for_cpu": _sdpa_cpu,
        "mkldnn_rnn_layer": _mkldnn_rnn_layer,
        "mv": _mv,
        "addmv": _addmv,
        "dot": _dot,
        "vdot": _dot,
        "_trilinear": _trilinear,
        "_grouped_mm": grouped_mm_flops,
    }
    for name, f in extra.items():
        packet = getattr(aten, name, None)
        if packet is not None and packet not in table:
            table[packet] = _shapes(f)
    return table


FORMULAS = _formulas()

#: Formulas of other libraries' custom ops, by qualified name (looked up when the op first runs:
#: the library registers it on import).
NAMED_FORMULAS: dict[str, Callable[..., int]] = {"transformers::grouped_mm_fallback": _shapes(grouped_mm_flops)}


def formula_for(packet) -> Callable[..., int] | None:
    """The FLOP formula of an op overload packet (ATen or a named custom op), or None."""
    f = FORMULAS.get(packet)
    if f is None:
        f = NAMED_FORMULAS.get(getattr(packet, "_qualified_op_name", ""))
    return f


# ATen ops that multiply-accumulate but have no formula: a node running one is "unmeasured".
_MAC_NAME = re.compile(r"conv|(^|_)(mm|bmm|mv|addmv|dot|vdot|matmul|linear|einsum|tensordot|cdist)($|_)|"
                       r"attention|rnn|lstm|gru|bilinear|trilinear")
_NOT_MAC = re.compile(r"^_?upsample|grid_sampler|affine_grid|_backward$|^_thnn_fused_(lstm|gru)_cell$|"
                      r"^_?(lstm|gru|rnn)_cell$|im2col|col2im|_cudnn_rnn_flatten_weight")


def _unmeasured(packet) -> bool:
    name = getattr(packet, "__name__", str(packet)).split(".")[-1]
    return bool(_MAC_NAME.search(name)) and not _NOT_MAC.search(name)


# Meta kernels of norms and of many activations are Python decompositions, 10-50x slower than the
# op on a small real tensor; their output shapes are trivial, so on meta tensors they are made directly.
def _norm_outputs(func, args):
    name = func._overloadpacket.__name__
    x = args[0]
    e = torch.empty(0, device="meta", dtype=x.dtype)
    if name == "native_layer_norm":
        k = len(args[1])
        stat = tuple(x.shape[: x.dim() - k]) + (1,) * k
        return torch.empty_like(x), torch.empty(stat, device="meta", dtype=x.dtype), torch.empty(
            stat, device="meta", dtype=x.dtype)
    if name == "native_group_norm":
        n, g = int(args[3]), int(args[6])
        return torch.empty_like(x), torch.empty((n, g), device="meta", dtype=x.dtype), torch.empty(
            (n, g), device="meta", dtype=x.dtype)
    if name == "_native_batch_norm_legit_no_training":
        return torch.empty_like(x), e, e.clone()
    training = bool(args[5]) if name == "native_batch_norm" else bool(args[3] if len(args) > 3 else False)
    c = x.shape[1] if x.dim() > 1 else x.shape[0]
    if training:
        return torch.empty_like(x), torch.empty(c, device="meta", dtype=x.dtype), torch.empty(
            c, device="meta", dtype=x.dtype)
    return torch.empty_like(x), e, e.clone()


_FAST_NORMS = {getattr(aten, n, None) for n in (
    "native_layer_norm", "native_group_norm", "native_batch_norm", "_native_batch_norm_legit_no_training",
)} - {None}
_FAST_UNARY = {getattr(aten, n, None) for n in (
    "gelu", "silu", "relu", "sigmoid", "tanh", "hardswish", "hardsigmoid", "hardtanh", "mish", "elu", "leaky_relu",
    "erf", "exp", "neg", "abs", "sqrt", "rsqrt", "reciprocal", "log", "softplus", "clone", "alias",
)} - {None}


def _fast_meta(func, args, kwargs):
    """The outputs of ``func`` on meta tensors when they follow from the input shape alone, else None."""
    if kwargs.get("out") is not None or not args or not isinstance(args[0], torch.Tensor) \
            or args[0].device.type != "meta":
        return None
    packet = func._overloadpacket
    if packet in _FAST_NORMS and func._schema.name.endswith(func._overloadpacket.__name__):
        if not all(a.device.type == "meta" for a in args if isinstance(a, torch.Tensor)):
            return None
        return _norm_outputs(func, args)
    if packet in _FAST_UNARY and func._overloadname in ("default", "") and not any(
            isinstance(a, torch.Tensor) for a in args[1:]) and not kwargs.get("memory_format"):
        x = args[0]
        if x.is_floating_point():
            return torch.empty_like(x)
    return None


class MacMeter(TorchDispatchMode):
    """A dispatch mode that adds up FLOPs of every ATen op with a formula (``flops``) and remembers
    the MAC-like ops without one (``unmeasured``)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self.unmeasured: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = _fast_meta(func, args, kwargs)
        if out is not None:
            return out
        out = func(*args, **kwargs)
        packet = getattr(func, "_overloadpacket", func)
        f = formula_for(packet)
        if f is not None:
            self.flops += int(f(*args, **kwargs, out_val=out))
        elif _unmeasured(packet):
            name = str(packet)
            if name not in self.unmeasured:
                self.unmeasured.append(name)
        return out

    @property
    def macs(self) -> int:
        return self.flops // 2


@dataclass
class GraphMeasure:
    """Measured MACs of a graph: ``total``, ``per_node`` and the nodes the counter cannot vouch for.

    Attributes:
        unmeasured: node name -> ATen ops that multiply-accumulate but have no FLOP formula.
        real_nodes: nodes that could not run on fake tensors and were run on real ones.
        failed: why the graph could not be measured at all ("" when it was).
    """

    total: int = 0
    per_node: dict[str, int] = field(default_factory=dict)
    unmeasured: dict[str, list[str]] = field(default_factory=dict)
    real_nodes: list[str] = field(default_factory=list)
    failed: str = ""

    @property
    def ok(self) -> bool:
        return not self.failed


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def meta_like(t: Any) -> Any:
    if isinstance(t, torch.Tensor):
        m = torch.empty_like(t, device="meta")
        return m.requires_grad_(t.requires_grad) if m.is_floating_point() or m.is_complex() else m
    return t


def _real_like(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.device.type == "meta":
        if x.is_floating_point() or x.is_complex():
            return torch.randn(x.shape, dtype=x.dtype, device="cpu")
        return torch.zeros(x.shape, dtype=x.dtype, device="cpu")
    return x


@contextlib.contextmanager
def on_meta(module: torch.nn.Module):
    """Every parameter, buffer and tensor attribute of ``module`` swapped for a meta tensor of the
    same shape (tied tensors stay tied), and factories default to the meta device."""
    from torch.nn.utils.stateless import _reparametrize_module

    state: dict[str, torch.Tensor] = {}
    by_id: dict[int, torch.Tensor] = {}
    for prefix, mod in module.named_modules(remove_duplicate=False):
        items = list(mod._parameters.items()) + list(mod._buffers.items()) + [
            (k, v) for k, v in vars(mod).items() if isinstance(v, torch.Tensor) and not k.startswith("__")]
        for k, v in items:
            if not isinstance(v, torch.Tensor) or v.device.type == "meta":
                continue
            if id(v) not in by_id:
                by_id[id(v)] = meta_like(v.detach()) if not isinstance(v, torch.nn.Parameter) else torch.nn.Parameter(
                    torch.empty_like(v, device="meta"), requires_grad=v.requires_grad)
            state[f"{prefix}.{k}" if prefix else k] = by_id[id(v)]
    with _reparametrize_module(module, state), torch.device("meta"):
        yield


class _Meter(torch.fx.Interpreter):
    def __init__(self, gm, meter: MacMeter, result: GraphMeasure):
        super().__init__(gm, garbage_collect_values=True)
        self.meter = meter
        self.result = result

    def run_node(self, n: torch.fx.Node) -> Any:
        flops, seen = self.meter.flops, len(self.meter.unmeasured)
        try:
            out = super().run_node(n)
        except Exception as err:  # data-dependent op (.item(), nonzero): run this one node on real tensors
            if n.op not in ("call_function", "call_method", "call_module"):
                raise
            out = self._run_real(n, err)
        macs = (self.meter.flops - flops) // 2
        if macs:
            self.result.per_node[n.name] = macs
        if len(self.meter.unmeasured) > seen:
            self.result.unmeasured[n.name] = self.meter.unmeasured[seen:]
            del self.meter.unmeasured[seen:]
        return out

    def _run_real(self, n: torch.fx.Node, err: Exception) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        args, kwargs = tree_map(_real_like, (args, kwargs))
        logger.debug("measured MACs: node %s runs on real tensors (%s: %s)", n.name, type(err).__name__, err)
        if n.op == "call_module":
            raise err  # its weights are meta tensors here: measured as a whole graph on real tensors instead
        with torch.device("cpu"), torch.no_grad():  # the meter stays active: it counts this node
            out = getattr(self, n.op)(n.target, args, kwargs)
        self.result.real_nodes.append(n.name)
        return tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, out)


class _RealMeter(_Meter):
    def _run_real(self, n, err):
        raise err


def measure_graph(gm: torch.fx.GraphModule, inputs: tuple) -> GraphMeasure:
    """Measured MACs per node of ``gm`` on ``inputs`` (placeholder order); never raises.

    Runs on meta tensors (no memory, no arithmetic); a node that cannot (data-dependent ops) runs on
    real tensors of its recorded shapes; a graph that still cannot is measured on real tensors.
    """
    was_training = gm.training
    gm.eval()
    try:
        result = GraphMeasure()
        try:
            meter = MacMeter()
            with on_meta(gm), torch.enable_grad(), meter:
                _Meter(gm, meter, result).run(*(meta_like(t) for t in inputs))
        except Exception as err:
            logger.debug("measuring MACs on meta tensors failed (%s); measuring on real tensors", err)
            result = GraphMeasure()
            meter = MacMeter()
            with torch.no_grad(), meter:
                _RealMeter(gm, meter, result).run(*inputs)
        result.total = sum(result.per_node.values())
    except Exception as err:  # never let the independent count break a compile: say why instead
        result = GraphMeasure(failed=f"{type(err).__name__}: "
                                     f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}")
        logger.debug("measuring MACs failed: %s", result.failed)
    finally:
        gm.train(was_training)
    return result


def measure_model(model: torch.nn.Module, inputs: Any) -> tuple[int, list[str]]:
    """MACs of one forward of ``model`` (eval mode) and the unmeasured MAC-like ops it ran.

    Meta tensors first, then fake tensors; a model that runs on neither (data-dependent ops) runs on
    real tensors.
    ``inputs``: a tensor, a tuple of tensors or a dict of keyword tensors.
    """
    if isinstance(inputs, torch.Tensor):
        args, kwargs = (inputs,), {}
    elif isinstance(inputs, dict):
        args, kwargs = (), dict(inputs)
    else:
        args, kwargs = tuple(inputs), {}
    was_training = model.training
    model.eval()
    try:
        try:
            meter = MacMeter()
            with on_meta(model), torch.enable_grad(), meter:
                model(*tree_map(meta_like, args), **tree_map(meta_like, kwargs))
        except Exception as err:
            logger.debug("measure_model: meta tensors failed (%s); trying fake tensors", err)
            try:
                mode = _fake_mode()
                meter = MacMeter()
                with mode, torch.enable_grad():
                    fargs = tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, args)
                    fkw = tree_map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, kwargs)
                    with meter:
                        model(*fargs, **fkw)
            except Exception as err2:
                logger.debug("measure_model: fake tensors failed (%s); running on real tensors", err2)
                meter = MacMeter()
                with torch.no_grad(), meter:
                    model(*args, **kwargs)
    finally:
        model.train(was_training)
    return meter.macs, list(meter.unmeasured)
