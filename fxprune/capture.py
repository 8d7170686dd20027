"""Capture: turn a user's ``nn.Module`` into a ``torch.fx.GraphModule`` fxprune can prune.

The user's model is never touched: capture works on a copy of its module structure (whose
tensors are copies too, or, with ``share_weights=True`` as ``fxprune.compile`` uses, parameters
are new tensor objects on the user's storage, read-only: no second copy of the weights). Before tracing, modules whose
internals matter for pruning but that torch.fx would keep opaque are replaced by equivalent,
traceable ones (``nn.MultiheadAttention`` becomes q/k/v/out ``nn.Linear`` layers around
``F.scaled_dot_product_attention``). After tracing, library ops that bake in a width are swapped
for fxprune's (torchvision's Swin window attention), and ``training=`` flags that tracing froze to
a constant are made to follow ``model.train()`` / ``model.eval()`` again.

Symbolic tracing (``torch.fx``) is the default. Models it cannot trace (data-dependent control
flow, Hugging Face transformers >= 5) are captured with ``torch.export`` (see ``_export.py``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import operator
import sys
import traceback
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from fxprune import ops as fx_ops
from fxprune.errors import TraceError

__all__ = ["Captured", "capture", "normalize_inputs", "DecomposedMultiheadAttention"]

logger = logging.getLogger(__name__)


@dataclass
class Captured:
    """A captured model: the graph module plus the example inputs it was captured with."""

    gm: torch.fx.GraphModule
    args: tuple
    kwargs: dict
    method: str = "fx"
    notes: list[str] = field(default_factory=list)

    @property
    def inputs(self) -> tuple:
        """Example inputs in placeholder order (keyword inputs appended in signature order)."""
        return self.args + tuple(self.kwargs.values())


def normalize_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Accept a tensor, a tuple/list of tensors, or a mapping of keyword tensors (a dict, a
    tokenizer's ``BatchEncoding``...)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        if len(example_inputs) == 2 and isinstance(example_inputs[1], Mapping) and isinstance(example_inputs[0], (tuple, list)):
            return tuple(example_inputs[0]), dict(example_inputs[1])
        return tuple(example_inputs), {}
    raise TraceError(
        f"example_inputs must be a tensor, a tuple of tensors or a mapping (dict) of keyword tensors, "
        f"got {type(example_inputs).__name__}. Pass e.g. example_inputs=(torch.randn(1, 3, 224, 224),)."
    )


# ------------------------------------------------------------------ MultiheadAttention decomposition

class DecomposedMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` as separate q/k/v/out projections (numerically equivalent).

    Traced through (not a leaf), so the projections become ordinary ``nn.Linear`` nodes whose
    heads fxprune can prune. Supports batch_first or not, biases, separate key/value dims,
    ``attn_mask``, ``key_padding_mask``, ``is_causal`` and ``need_weights``.
    """

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        e, h = mha.embed_dim, mha.num_heads
        self.num_heads = h
        self.head_dim = e // h
        self.batch_first = mha.batch_first
        self.dropout = mha.dropout
        has_bias = mha.in_proj_bias is not None
        # the projections live where the original's weights live, in their dtype (fp16/bf16/fp64, CUDA)
        ref = mha.in_proj_weight if mha._qkv_same_embed_dim else mha.q_proj_weight
        kw = {"device": ref.device, "dtype": ref.dtype}
        self.q_proj = nn.Linear(e, e, bias=has_bias, **kw)
        self.k_proj = nn.Linear(mha.kdim, e, bias=has_bias, **kw)
        self.v_proj = nn.Linear(mha.vdim, e, bias=has_bias, **kw)
        self.out_proj = nn.Linear(e, mha.out_proj.out_features, bias=mha.out_proj.bias is not None,
                                  device=mha.out_proj.weight.device, dtype=mha.out_proj.weight.dtype)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                wq, wk, wv = mha.in_proj_weight.chunk(3)
            else:
                wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            self.q_proj.weight.copy_(wq)
            self.k_proj.weight.copy_(wk)
            self.v_proj.weight.copy_(wv)
            if has_bias:
                bq, bk, bv = mha.in_proj_bias.chunk(3)
                self.q_proj.bias.copy_(bq)
                self.k_proj.bias.copy_(bk)
                self.v_proj.bias.copy_(bv)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                self.out_proj.bias.copy_(mha.out_proj.bias)
        self.train(mha.training)

    @staticmethod
    def supports(mha: nn.MultiheadAttention) -> bool:
        return mha.bias_k is None and not mha.add_zero_attn

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        n, lq = query.shape[0], query.shape[1]
        ls = key.shape[1]
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(query).view(n, lq, h, d).transpose(1, 2)
        k = self.k_proj(key).view(n, ls, h, d).transpose(1, 2)
        v = self.v_proj(value).view(n, ls, h, d).transpose(1, 2)
        mask = None
        if attn_mask is not None:
            mask = _additive_mask(attn_mask, q.dtype)
            if mask.dim() == 3:
                mask = mask.view(n, h, lq, ls)
        if key_padding_mask is not None:
            pad = _additive_mask(key_padding_mask, q.dtype).view(n, 1, 1, ls)
            mask = pad if mask is None else mask + pad
        if need_weights:
            scores = q.matmul(k.transpose(-2, -1)) * (1.0 / math.sqrt(d))
            if mask is not None:
                scores = scores + mask
            if is_causal and mask is None:
                scores = scores + torch.triu(torch.full((lq, ls), float("-inf"), dtype=q.dtype, device=q.device), 1)
            weights = F.softmax(scores, dim=-1)
            out = F.dropout(weights, p=self.dropout, training=self.training).matmul(v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0,
                                                 is_causal=bool(is_causal and mask is None))
            weights = None
        out = out.transpose(1, 2).reshape(n, lq, h * d)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights


def _additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def _meta_twin(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are meta tensors (same shapes, dtypes)."""
    memo: dict[int, Any] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def _share_projections(dec: DecomposedMultiheadAttention, mha: nn.MultiheadAttention) -> None:
    """Point the decomposed projections at (views of) the attention's own tensors: no copy."""
    if mha._qkv_same_embed_dim:
        wq, wk, wv = mha.in_proj_weight.chunk(3)
    else:
        wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    pairs = [(dec.q_proj, "weight", wq), (dec.k_proj, "weight", wk), (dec.v_proj, "weight", wv),
             (dec.out_proj, "weight", mha.out_proj.weight)]
    if mha.in_proj_bias is not None:
        bq, bk, bv = mha.in_proj_bias.chunk(3)
        pairs += [(dec.q_proj, "bias", bq), (dec.k_proj, "bias", bk), (dec.v_proj, "bias", bv)]
    if mha.out_proj.bias is not None:
        pairs.append((dec.out_proj, "bias", mha.out_proj.bias))
    for layer, name, src in pairs:
        layer._parameters[name] = nn.Parameter(src.detach(), requires_grad=src.requires_grad)


def _decompose_attention(model: nn.Module, notes: list[str]) -> None:
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if type(child) is nn.MultiheadAttention:
                path = f"{name}.{child_name}" if name else child_name
                if DecomposedMultiheadAttention.supports(child):
                    # scale: built from a meta twin (no allocation, no random init, no copy), then
                    # pointed at the attention's own tensors: no second copy of the weights
                    dec = DecomposedMultiheadAttention(_meta_twin(child))
                    _share_projections(dec, child)
                    setattr(mod, child_name, dec)
                else:
                    notes.append(f"{path}: nn.MultiheadAttention with add_bias_kv/add_zero_attn kept opaque")


# ----------------------------------------------------------------------------------- tracing

class _Tracer(torch.fx.Tracer):
    """torch.fx tracer that remembers which module it was in when something failed."""

    def __init__(self, leaf_types: Sequence[type] = (), autowrap_functions: Sequence[Any] = (),
                 optional_leaf_types: Sequence[type] = (), forced_leaves: Sequence[str] = ()):
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self.leaf_types = tuple(leaf_types)
        self.optional_leaf_types = tuple(optional_leaf_types)
        self.forced_leaves = set(forced_leaves)
        self.inlined: set[str] = set()
        self.stack: list[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, DecomposedMultiheadAttention):
            return False
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if self.optional_leaf_types and isinstance(m, self.optional_leaf_types):
            if qualname in self.forced_leaves:
                return True
            self.inlined.add(qualname)
            return False
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self.stack.pop()


def _timm_extras() -> tuple[tuple[type, ...], tuple[Any, ...]]:
    """timm's own not-traceable modules and functions, when the user's model comes from timm."""
    if "timm" not in sys.modules:
        return (), ()
    try:
        from timm.layers import _fx as timm_fx  # type: ignore
    except Exception:
        return (), ()
    return tuple(getattr(timm_fx, "_leaf_modules", ())), tuple(getattr(timm_fx, "_autowrap_functions", ()))


def _explain(err: Exception) -> str:
    text = f"{type(err).__name__}: {err}"
    if "symbolically traced variables cannot be used as inputs to control flow" in text or "Proxy" in text and "bool" in text:
        return "data-dependent Python control flow (an `if`/`for` on a tensor value or shape)"
    if "iteration" in text.lower() and "proxy" in text.lower():
        return "iterating over a traced tensor"
    if "NotImplementedError" in text:
        return "an operation torch.fx cannot trace"
    return "an unsupported Python construct"


def _leaf_root_graph(model: nn.Module, args: tuple, kwargs: dict) -> torch.fx.GraphModule:
    """A model that is itself a leaf type (a bare ``nn.Conv2d``) becomes a one-call graph."""
    root = nn.Module()
    root.add_module("module", model)
    graph = torch.fx.Graph()
    pos = tuple(graph.placeholder(f"input_{i}") for i in range(len(args)))
    kw = {k: graph.placeholder(k) for k in kwargs}
    graph.output(graph.call_module("module", pos, kw))
    return torch.fx.GraphModule(root, graph, type(model).__name__)


def _concrete_defaults(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """Forward parameters the caller does not supply, fixed to their defaults while tracing.

    Without this, optional inputs such as ``attn_mask=None`` become graph inputs and the exported
    model expects them.
    """
    import inspect

    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None
    out: dict[str, Any] = {}
    for i, (name, p) in enumerate(sig.parameters.items()):
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            continue
        if i < len(args) or name in kwargs:
            continue
        out[name] = None if p.default is inspect.Parameter.empty else p.default
    return out or None


_GUARDS = {torch._assert, operator.eq, operator.is_, getattr(torch.fx._symbolic_trace, "_assert_is_none", None)}


def _drop_specialized_inputs(graph: torch.fx.Graph, concrete: dict[str, Any]) -> None:
    """fx keeps a placeholder plus an assert guard per concrete argument; remove both, so the
    captured model takes exactly the inputs of the example."""
    for node in list(graph.nodes):
        if node.op != "placeholder" or node.target.rstrip("_0123456789") not in concrete:
            continue
        chain, frontier = [], [node]
        while frontier:
            n = frontier.pop()
            chain.append(n)
            frontier.extend(u for u in n.users if u not in chain)
        if all(n is node or (n.op == "call_function" and n.target in _GUARDS) for n in chain):
            for n in reversed(chain):
                if n in graph.nodes and not n.users:
                    graph.erase_node(n)
            for n in reversed(chain):  # second sweep for nodes freed by the first
                if n in graph.nodes and not n.users:
                    graph.erase_node(n)


def trace_fx(model: nn.Module, args: tuple, kwargs: dict, leaf_modules: Sequence[type] = (),
             proxy_buffers: bool = False, allow_buffer_updates: bool = False,
             notes: list[str] | None = None) -> torch.fx.GraphModule:
    """Symbolically trace ``model`` (already a private copy).

    Raises ``BuffersMutated`` when the forward updated buffers while being traced (the update ran on
    the copy instead of being recorded); trace a fresh copy with ``proxy_buffers=True`` then, which
    records buffer reads as graph values, so in-place updates stay in the graph.

    timm marks some modules as not traceable (``register_notrace_module``): an opaque leaf would hide
    its channels and MACs from fxprune. Such modules are traced through where torch.fx can, and kept
    as leaves where it cannot: a trace that fails inside one of them is retried with that instance
    as a leaf; a graph with traced-through modules must reproduce the model's outputs on the example
    inputs, else everything timm marks is kept opaque. Leaves that stay opaque are then recorded with
    torch.export where possible (``fxprune.leaf_export``).
    """
    from fxprune._buffers import buffer_state

    timm_leaves, timm_wraps = _timm_extras()
    user_leaves = tuple(leaf_modules)
    optional = tuple(t for t in timm_leaves if not (user_leaves and issubclass(t, user_leaves)))
    if optional and not (user_leaves and isinstance(model, user_leaves)) and not isinstance(model, optional):
        gm = _trace_through(model, args, kwargs, user_leaves, optional, timm_wraps, proxy_buffers,
                            allow_buffer_updates, notes)
        if gm is not None:
            return gm
    tracer = _Tracer(user_leaves + timm_leaves, timm_wraps)
    tracer.proxy_buffer_attributes = proxy_buffers
    if tracer.is_leaf_module(model, ""):
        return _leaf_root_graph(model, args, kwargs)
    concrete = _concrete_defaults(model, args, kwargs)
    before = buffer_state(model)
    try:
        graph = tracer.trace(model, concrete_args=concrete)
    except TraceError:
        raise
    except Exception as err:
        where = tracer.stack[-1] if tracer.stack else ""
        construct = _explain(err)
        frame = ""
        tb = traceback.extract_tb(err.__traceback__)
        user = [f for f in tb if "torch/fx" not in f.filename and "torch/_" not in f.filename]
        if user:
            f = user[-1]
            frame = f" at {f.filename}:{f.lineno} ({f.line})"
        raise TraceError(
            f"torch.fx could not trace {'module ' + repr(where) if where else 'the model'}: {construct}{frame}. "
            f"Original error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. "
            "What you can do: pass leaf_modules=[ThatModuleClass] so fxprune treats it as an opaque op "
            "(it will not be pruned inside), rewrite the branch with torch.where, or use capture='export' "
            "to capture with torch.export.",
            module_path=where,
            construct=construct,
        ) from None
    gm = _traced_module(model, tracer, graph, before, concrete, proxy_buffers, allow_buffer_updates)
    return _export_leaves(gm, model, args, kwargs, optional, notes) if optional else gm


def _traced_module(model, tracer, graph, before, concrete, proxy_buffers, allow_buffer_updates) -> torch.fx.GraphModule:
    """The GraphModule of a finished trace: buffer reassignments written back (``proxy_buffers``)
    or in-place buffer updates refused, inputs fixed by ``concrete_args`` dropped."""
    from fxprune._buffers import BuffersMutated, mutated_buffers, write_back_reassigned

    if proxy_buffers:
        write_back_reassigned(model, graph, before)
    else:
        mutated = mutated_buffers(model, before)
        if mutated and not allow_buffer_updates:
            raise BuffersMutated(mutated)
    if concrete:
        _drop_specialized_inputs(graph, concrete)
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)


def _trace_through(model, args, kwargs, user_leaves, optional, wraps, proxy_buffers, allow_buffer_updates,
                   notes) -> torch.fx.GraphModule | None:
    """The trace with timm's not-traceable modules traced through where torch.fx can (None: use the
    trace with all of them as leaves)."""
    from fxprune._buffers import buffer_state

    forced: list[str] = []
    before = buffer_state(model)
    for _ in range(8):
        tracer = _Tracer(user_leaves, wraps, optional, forced)
        tracer.proxy_buffer_attributes = proxy_buffers
        concrete = _concrete_defaults(model, args, kwargs)
        try:
            graph = tracer.trace(model, concrete_args=concrete)
        except Exception:
            failing = _failing_optional_leaf(tracer, model, optional)
            if failing is None or failing in forced:
                return None
            forced.append(failing)
            continue
        gm = _traced_module(model, tracer, graph, before, concrete, proxy_buffers, allow_buffer_updates)
        inlined = sorted(tracer.inlined)
        if inlined and not _same_outputs(model, gm, args, kwargs):
            return None
        if inlined and notes is not None:
            kinds = sorted({type(model.get_submodule(q)).__name__ for q in inlined})
            notes.append(f"timm: traced through {len(inlined)} module(s) timm marks as not traceable "
                         f"({', '.join(kinds)})" + (f"; kept opaque: {', '.join(forced)}" if forced else ""))
        return _export_leaves(gm, model, args, kwargs, optional, notes) if forced else gm
    return None


def _export_leaves(gm, model, args, kwargs, optional, notes) -> torch.fx.GraphModule:
    """Opaque timm leaves recorded with torch.export and inlined (see ``fxprune.leaf_export``)."""
    from fxprune.leaf_export import export_leaves

    try:
        return export_leaves(gm, args, kwargs, lambda m: isinstance(m, optional),
                             lambda new: _same_outputs(model, new, args, kwargs), notes if notes is not None else [])
    except Exception as err:  # never worse than the opaque leaf
        logger.debug("exporting opaque leaves failed: %s", err)
        return gm


@contextlib.contextmanager
def buffers_restored(module: nn.Module):
    """Run something on ``module`` and put every buffer's value back afterwards (a forward that
    updates buffers in place must not change the copy, or the caller's tensors it shares)."""
    saved = [(b, b.detach().clone()) for b in {id(b): b for b in module.buffers()}.values()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                if b.shape == v.shape:
                    b.copy_(v)


def _failing_optional_leaf(tracer: _Tracer, model: nn.Module, optional: tuple[type, ...]) -> str | None:
    """The innermost module timm marks as not traceable on the stack of a failed trace."""
    for path in reversed(tracer.stack):
        try:
            mod = model.get_submodule(path) if path else model
        except AttributeError:
            continue
        if isinstance(mod, optional):
            return path
    return None


def _same_outputs(model: nn.Module, gm: torch.fx.GraphModule, args: tuple, kwargs: dict) -> bool:
    """True when ``gm`` reproduces ``model``'s outputs on the example inputs (eval mode)."""
    from torch.utils._pytree import tree_leaves

    try:
        with torch.no_grad(), buffers_restored(model), buffers_restored(gm):
            ref = tree_leaves(model(*args, **kwargs))
            out = tree_leaves(gm(*args, **kwargs))
    except Exception:
        return False
    if len(ref) != len(out):
        return False
    for a, b in zip(ref, out):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return False
        if isinstance(a, torch.Tensor):
            if a.shape != b.shape or a.dtype != b.dtype:
                return False
            if a.is_floating_point():
                scale = float(a.abs().max()) if a.numel() else 0.0
                if not torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, scale), equal_nan=True):
                    return False
            elif not torch.equal(a, b):
                return False
        elif a != b:
            return False
    return True


# ------------------------------------------------------------------------------ graph fixes

def _swap_window_attention(gm: torch.fx.GraphModule) -> int:
    if "torchvision" not in sys.modules:  # the model cannot call what was never imported
        return 0
    try:
        import torchvision.models.swin_transformer as tv_swin
    except Exception:  # pragma: no cover
        return 0
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is tv_swin.shifted_window_attention:
            node.target = fx_ops.window_attention
            n += 1
    return n


_TRAINING_ARGS: dict[Any, tuple[int, str]] = {
    F.dropout: (2, "training"),
    F.dropout1d: (2, "training"),
    F.dropout2d: (2, "training"),
    F.dropout3d: (2, "training"),
    F.alpha_dropout: (2, "training"),
    F.feature_alpha_dropout: (2, "training"),
    F.batch_norm: (5, "training"),
    fx_ops.window_attention: (12, "training"),
}


def _training_args() -> dict[Any, tuple[int, str]]:
    """``_TRAINING_ARGS``, with torchvision's stochastic depth once torchvision is imported."""
    if "torchvision" in sys.modules:
        try:
            from torchvision.ops import stochastic_depth

            _TRAINING_ARGS.setdefault(stochastic_depth, (3, "training"))
        except Exception:  # pragma: no cover
            pass
    return _TRAINING_ARGS


def _live_training_flags(gm: torch.fx.GraphModule, traced_training: bool) -> int:
    """Replace ``training=<const>`` frozen by tracing with ``self.training`` of the graph module."""
    n = 0
    flag = None
    training_args = _training_args()
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in training_args:
            continue
        pos, name = training_args[node.target]
        if pos < len(node.args):
            value, where = node.args[pos], "arg"
        elif name in node.kwargs:
            value, where = node.kwargs[name], "kw"
        else:
            continue
        if not isinstance(value, bool) or value != traced_training:
            continue
        if flag is None:
            first = next(iter(gm.graph.nodes))
            with gm.graph.inserting_after(first), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # `training` is a plain attribute, not a parameter
                flag = gm.graph.get_attr("training")
        if where == "arg":
            args = list(node.args)
            args[pos] = flag
            node.args = tuple(args)
        else:
            node.kwargs = {**node.kwargs, name: flag}
        n += 1
    if flag is not None:
        # the get_attr must come before its first use: move it right after the placeholders
        last_ph = [nd for nd in gm.graph.nodes if nd.op == "placeholder"][-1]
        last_ph.append(flag)
    return n


def share_tensors(tensors) -> dict[int, Any]:
    """A deepcopy memo that shares each tensor's storage under a new tensor object.

    Parameters become new ``nn.Parameter`` objects on the same storage (same ``requires_grad``),
    buffers ``detach()``-ed views: ``.to()``, ``.half()`` or ``requires_grad_`` on the copy never
    reach the original's tensors, and nothing is read or copied (memory-mapped weights stay
    unread). In-place writes to the data would reach the original: the copy is read-only.
    """
    memo: dict[int, Any] = {}
    for t in tensors:
        if id(t) in memo:
            continue
        if type(t) is nn.Parameter:
            memo[id(t)] = nn.Parameter(t.detach(), requires_grad=t.requires_grad)
        elif type(t) is torch.Tensor:
            memo[id(t)] = t.detach()
        else:  # tensor subclasses (quantized, DTensor ...): keep the object itself
            memo[id(t)] = t
    return memo


def _copy_model(model: nn.Module, share_weights: bool) -> nn.Module:
    from fxprune.substitutes import copy_memo

    memo: dict[int, Any] = copy_memo(model)
    if share_weights:
        # parameters share the user's storage under new Parameter objects (no copy; .to() on the
        # capture never reaches the user's model); buffers are copied: analyses run the graph,
        # which may update buffers in place (and they are small)
        memo.update(share_tensors(model.parameters()))
    try:
        return copy.deepcopy(model, memo)
    except Exception as err:
        raise TraceError(
            f"could not copy {type(model).__name__} ({type(err).__name__}: {err}); fxprune works on a copy so "
            "your model is never modified. Make the model deep-copyable (e.g. no open files or locks as attributes)."
        ) from err


def _disable_kv_cache(model: nn.Module, notes: list[str]) -> None:
    """Hugging Face decoders return a KV cache object by default (``config.use_cache``), which no
    graph capture can return; capture runs the model's *copy* with the cache off (the user's
    model and its config are untouched)."""
    seen: set[int] = set()
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is None or id(cfg) in seen or not getattr(cfg, "use_cache", False):
            continue
        seen.add(id(cfg))
        try:
            cfg.use_cache = False
        except Exception:  # a read-only config: leave it, the capture error will say why
            continue
    if seen:
        notes.append("config.use_cache=False on the captured copy (a KV cache cannot be a graph output)")


def _prepared_copy(model: nn.Module, share_weights: bool, notes: list[str]) -> nn.Module:
    """capture's private copy of ``model``, in eval mode, with stock modules made traceable."""
    work = _copy_model(model, share_weights)
    work.eval()
    _disable_kv_cache(work, notes)
    from fxprune.substitutes import prepare_model as _prepare_stock_modules

    work = _prepare_stock_modules(work, notes)
    _decompose_attention(work, notes)
    from fxprune.opset import torchvision_ops

    torchvision_ops.install()  # torchvision's helpers, when the model's code imported torchvision
    if "timm" in sys.modules:  # timm attention through SDPA, LeViT attention substitutes
        from fxprune.opset.timm_ops import prepare_model

        prepare_model(work, notes)
    return work


def _trace_fx_keeping_buffer_updates(model, work, args, kwargs, leaf_modules, share_weights,
                                     notes) -> tuple[torch.fx.GraphModule, nn.Module]:
    """``trace_fx``; when the forward updates buffers in place, trace a fresh copy again with the
    buffers as graph values so the update is part of the captured model (see ``fxprune._buffers``)."""
    from fxprune._buffers import BuffersMutated

    try:
        return trace_fx(work, args, kwargs, leaf_modules, notes=notes), work
    except BuffersMutated as err:
        mutated = err
        names = ", ".join(err.names[:5])
    work = _prepared_copy(model, share_weights, [])
    try:
        gm = trace_fx(work, args, kwargs, leaf_modules, proxy_buffers=True, notes=notes)
        notes.append(f"the forward updates buffers in place ({names}); the update is part of the captured graph")
        return gm, work
    except TraceError:
        pass
    # tracing with buffers as graph values failed (Python logic on a buffer's value): keep the plain trace,
    # with the buffers as they were before it ran, and say that the update is lost
    work = _prepared_copy(model, share_weights, [])
    gm = trace_fx(work, args, kwargs, leaf_modules, allow_buffer_updates=True, notes=notes)
    originals = dict(model.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for path in mutated.names:
            try:
                gm.get_buffer(path).copy_(originals[path])
            except (AttributeError, KeyError, RuntimeError):
                continue
    notes.append(f"the forward updates buffers in place ({names}); torch.fx could not record that update, so the "
                 "captured (and pruned) model does not perform it")
    return gm, work


def capture(
    model: nn.Module,
    example_inputs: Any,
    *,
    method: str = "auto",
    leaf_modules: Sequence[type] = (),
    share_weights: bool = False,
    dynamic: bool = True,
) -> Captured:
    """Capture ``model`` as a torch.fx graph module (on a deep copy, in eval mode).

    Args:
        model: any ``nn.Module``; it is not modified.
        example_inputs: a tensor, a tuple of tensors, or a dict of keyword tensors.
        method: "fx" (torch.fx symbolic tracing), "export" (torch.export, ATen-level graph turned
            back into modules) or "auto" (fx first, then export).
        leaf_modules: module classes to keep opaque (not traced into, not pruned inside).
        share_weights: copy the module structure but share the storage of the parameters with
            ``model`` (no memory, nothing read; for read-only uses: counting MACs,
            ``fxprune.compile``, which builds pruned tensors by index-select from these); buffers
            are copied. The captured parameters are new objects, so ``.to()``/``.half()`` on the
            capture never reach ``model``; writing into their data in place would. The default
            copies everything.
        dynamic: torch.export path only: batch/sequence dims dynamic (default). ``False`` is
            faster and enough when no model will be built from the capture (counting, planning).

    Raises:
        TraceError: when the model cannot be captured; the message names the module and the
            construct that failed and what to do.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"fxprune needs a torch.nn.Module, got {type(model).__name__}.")
    if method not in ("auto", "fx", "export"):
        raise TraceError(f"capture method must be 'auto', 'fx' or 'export', got {method!r}.")
    if not isinstance(leaf_modules, (str, type)) and hasattr(leaf_modules, "__iter__"):
        leaf_modules = tuple(leaf_modules)
    if not isinstance(leaf_modules, tuple) or not all(isinstance(c, type) and issubclass(c, nn.Module)
                                                      for c in leaf_modules):
        raise TraceError(f"leaf_modules must be a list of nn.Module classes, got {leaf_modules!r:.80}.")
    args, kwargs = normalize_inputs(example_inputs)
    for i, a in enumerate(list(args) + list(kwargs.values())):
        if not isinstance(a, torch.Tensor):
            raise TraceError(f"example input {i} is a {type(a).__name__}; every example input must be a tensor.")
    notes: list[str] = []
    # private copies: running the captured graph must never apply an in-place input update to the caller's tensors
    args = tuple(a.detach().clone() for a in args)
    kwargs = {k: v.detach().clone() for k, v in kwargs.items()}
    work = _prepared_copy(model, share_weights, notes)
    fx_error: TraceError | None = None
    if method in ("auto", "fx"):
        try:
            gm, work = _trace_fx_keeping_buffer_updates(model, work, args, kwargs, leaf_modules, share_weights,
                                                        notes)
        except TraceError as err:
            if method == "fx":
                raise
            fx_error = err
        else:
            if _swap_window_attention(gm):
                notes.append("torchvision shifted_window_attention -> fxprune.ops.window_attention")
            _live_training_flags(gm, traced_training=False)
            gm.graph.lint()
            gm.recompile()
            gm.eval()
            return Captured(gm, args, kwargs, "fx", notes)
    from fxprune._export import capture_export

    try:
        gm = capture_export(work, args, kwargs, notes, dynamic=dynamic)
    except TraceError as err:
        if fx_error is not None:
            raise TraceError(f"{fx_error}\nAlso tried torch.export: {err}", module_path=fx_error.module_path,
                             construct=fx_error.construct) from None
        raise
    if fx_error is not None:
        notes.append(f"torch.fx failed ({fx_error.construct}); captured with torch.export")
    gm.eval()
    return Captured(gm, args, kwargs, "export", notes)
