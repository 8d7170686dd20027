"""Hugging Face language models stay Hugging Face models.

``fxprune.compile`` works on a captured graph, so ``result.model`` is a ``torch.fx.GraphModule``
for every model (ONNX export, ``fxprune.save``, latency and ``count_macs`` treat all models
alike). For a Hugging Face causal LM whose layers fxprune can read, :meth:`CompileResult.to_hf`
(:func:`to_hf`) rebuilds the pruned model as an instance of the *original class* with an updated
config (hidden size, heads, KV heads, ``head_dim``, intermediate size), so ``generate()`` with the
KV cache, ``save_pretrained`` and ``AutoModelForCausalLM.from_pretrained`` work as before.

Which models: GPT-2, and any decoder whose layers (every one alike) have a query (or fused q/k/v)
projection and an attention output projection under one of the names in :data:`_NAMES`, and whose
config has ``hidden_size``, ``num_attention_heads`` and a field that sizes the MLP. That is found
from the model's structure, not from a list of model types: LLaMA's naming covers Mistral,
Qwen2/3, Phi-3, Gemma 1-3, Granite, OLMo 1-2, Cohere, StableLM, Helium, GLM and SmolLM3; Phi,
Starcoder2, GPT-J, GPT-NeoX, OPT and Falcon name theirs otherwise; the MLP may be a mixture of
experts (Mixtral, Qwen2-MoE, GPT-OSS, Granite-MoE, PhiMoE, ...).

What the config can express is measured, not assumed: the class is instantiated on the meta device
(no memory, no arithmetic) with one field changed at a time, and the tensors that change are read:

* which fields size the MLP and which tensors they size (:func:`_mlp_widths`: ``intermediate_size``
  -> ``mlp.down_proj``; Mixtral's ``intermediate_size`` -> the experts; Qwen2-MoE's
  ``moe_intermediate_size`` and ``shared_expert_intermediate_size``), checked at a second value so
  a class that rounds the field (LFM2) is not trusted;
* what the heads and the hidden size resize (:func:`_heads_sized`, :func:`_resized`): every
  tensor dim of a group must be one its config field resizes, and every tensor dim the field
  resizes must be in the group, else the group is left whole (BitNet's ``attn_sub_norm`` is sized
  by ``hidden_size`` but sits on the heads; OLMoE's ``q_norm`` likewise);
* whether attention is sized by ``config.head_dim`` (:func:`_head_dim_free`), and float constants
  derived from ``hidden_size`` (:func:`_hidden_constants`: nGPT-style scales keep the residual whole).

A config has one width per kind of layer, so the plan must keep the same counts in every layer.
For these models :func:`layout_for` ties the groups that play the same role in every layer into
one decision variable (see :mod:`fxprune.tying`), which is on by default
(``compile(layer_uniform=None)``); groups the config cannot express are left whole, and the
report's notes say why:

==========================  =========================================================================
``head_dim`` in the config  ``hidden_size`` (the residual stream), ``num_key_value_heads`` (a KV head
(LLaMA, Qwen, Gemma, ...)   is pruned with its query heads, so ``num_attention_heads`` follows),
                            the MLP width; ``head_dim`` is kept (and written to the config).
``head_dim`` derived        ``head_dim = hidden_size // num_attention_heads`` (GPT-2, StableLM,
(GPT-2, StableLM, GPT-NeoX, GPT-NeoX, OPT, GPT-J): the heads of every layer and the residual stream
OPT, GPT-J)                 are one variable (the residual keeps ``head_dim`` channels per kept
                            query head); the MLP width.
scaled embeddings (Gemma)   the class multiplies the input embeddings by ``sqrt(hidden_size)``, so
                            a pruned residual would change that factor: the residual stays whole.
validated divisibility      the config's ``validate()`` refuses ``hidden_size % num_attention_heads``
(LLaMA, Gemma 3)            != 0 (probed on copies): head counts and residual widths are narrowed
                            independently so that every pair divides (:func:`_dividing_widths`).
mixtures of experts         each field that sizes the MLP is one decision for all layers; a field that
                            sizes several groups per layer (Qwen2-MoE's shared expert, HunYuan's) ties
                            them proportionally. The experts keep multiples of 8 channels (the
                            grouped-matmul kernels need 16-byte strides).
==========================  =========================================================================

A budget that no such plan reaches is planned per layer instead (``_compile`` notes it), and
:func:`to_hf` then refuses with that reason.

The rebuilt model takes the pruned graph's tensors by their (unchanged) names and is checked
against the graph: the logits on the example inputs must agree.
"""

from __future__ import annotations

import copy
import math
import inspect
import logging
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from fxprune._io import default_file_mode
from fxprune._export import _first_line
from fxprune.errors import ConfigError, ExportError, FxpruneError, PostconditionError
from fxprune.tying import Tie

logger = logging.getLogger(__name__)

__all__ = ["HFSource", "Layout", "source_of", "layout_for", "hf_config_for", "to_hf", "save_pretrained", "FAMILIES"]

#: ``config.model_type`` -> how fxprune rewrites the config, for the families the tests pin; any other
#: decoder whose layers :func:`_layer_names` reads is rebuilt the "llama" way.
FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "phi3": "llama",
            "gpt2": "gpt2"}


@dataclass
class HFSource:
    """What :func:`to_hf` needs of the user's model (taken at compile time; the model is not kept)."""

    cls: type
    config: Any
    generation_config: Any
    family: str
    layers: str  # path of the decoder layer list: "model.layers", "transformer.h"
    n_layers: int
    head_dim: int
    example: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    #: the class sizes attention by ``config.head_dim``; else ``head_dim = hidden_size // heads`` and
    #: the residual width is tied to the heads (GPT-2, StableLM, GPT-NeoX, OPT, GPT-J)
    head_dim_free: bool = True
    #: the input embeddings' factor when the class derives it from the hidden size (Gemma)
    embed_scale: float | None = None
    #: float constants the class derives from the hidden size (``module.attr``: nGPT's scales), measured
    hidden_constants: tuple[str, ...] = ()
    #: the layer's projections by role (:data:`_NAMES`), for every family but GPT-2
    names: dict[str, str] = field(default_factory=dict)
    #: MLP widths by config field: ``{field: {layer: (tensor inside the layer, dim)}}`` (:func:`_mlp_widths`)
    widths: dict[str, dict[int, tuple[str, int]]] = field(default_factory=dict)
    #: per role ("heads", or an MLP width field): every ``(tensor inside a layer, dim)`` the config resizes
    #: with it (measured); a group of that role with another tensor dim cannot be expressed
    sized: dict[str, frozenset] = field(default_factory=dict)
    #: the config refuses a hidden size that is not a multiple of num_attention_heads
    heads_divide_hidden: bool = False
    #: why this compile's plan cannot be rebuilt (set when it was planned per layer), else ""
    refused: str = ""


@dataclass
class Layout:
    """Ties (one keep count for several groups) and groups left whole, with notes for the report."""

    ties: list[Tie] = field(default_factory=list)
    fixed: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: group id -> the only keep counts its config can express (besides its size)
    allowed: dict[int, tuple[int, ...]] = field(default_factory=dict)


def _is_hf(model: nn.Module) -> bool:
    if "transformers" not in sys.modules:
        return False
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _layers_path(model: nn.Module) -> tuple[str, int] | None:
    """The path of the ``nn.ModuleList`` of decoder layers (the longest list of blocks)."""
    best = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and (best is None or len(mod) > best[1]):
            best = (name, len(mod))
    return best


#: Where a decoder layer keeps the projections :func:`hf_config_for` reads the attention widths off,
#: per role (the first name present in layer 0 is the model's, and every layer must have it): the
#: query and key projections (or a fused q/k/v one) and the attention output. The MLP widths come
#: from :func:`_mlp_widths` (dense or mixture of experts, alike or not in every layer).
_NAMES = {
    "q": ("self_attn.q_proj", "attn.q_proj", "attn.attention.q_proj"),
    "k": ("self_attn.k_proj", "attn.k_proj", "attn.attention.k_proj"),
    "qkv": ("self_attn.qkv_proj", "attention.query_key_value", "self_attention.query_key_value",
            "self_attn.query_key_value", "attn.c_attn", "attn.Wqkv"),
    "o": ("self_attn.o_proj", "self_attn.dense", "self_attn.out_proj", "attn.out_proj", "attention.dense",
          "self_attention.dense", "attn.attention.out_proj", "attn.c_proj"),
}
#: Config fields that may hold an MLP width (besides any int field named like ``*intermediate*``,
#: ``*ffn*`` or ``*inner*``); which of them size which tensors is measured (:func:`_mlp_widths`).
_INTERMEDIATE = ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "moe_intermediate_size",
                 "shared_expert_intermediate_size")
_WIDTH_FIELD = re.compile(r"intermediate|ffn|inner")


def _layer_names(model: nn.Module, layers: str) -> dict[str, str] | None:
    """The projections of a decoder layer by role (see :data:`_NAMES`), when its layout is one
    :func:`hf_config_for` can write a config for, else None. LLaMA's naming
    (``self_attn.{q,k,v,o}_proj`` or a fused ``qkv_proj``, ``mlp.down_proj``) is shared by Gemma 1-3,
    Granite, OLMo 1-2, Cohere, StableLM, Helium, GLM, SmolLM3 and more; Phi, Starcoder2, GPT-J,
    GPT-NeoX and OPT name them otherwise."""
    try:
        blocks = list(model.get_submodule(layers))
    except AttributeError:
        return None
    if not blocks:
        return None
    present = [{n for n, m in block.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)}
               for block in blocks]
    found = {role: next((n for n in cands if n in present[0]), None) for role, cands in _NAMES.items()}
    if found["o"] is None or found["qkv"] is None and (found["q"] is None or found["k"] is None):
        return None  # (latent attention, DeepSeek's MLA, has no key projection: its heads are not config widths)
    if any(n is not None and n not in p for p in present[1:] for n in found.values()):
        return None  # layers of several kinds (linear-attention or recurrent layers between attention layers)
    for n in found.values():
        if n is not None and len({tuple(block.get_submodule(n).weight.shape) for block in blocks}) > 1:
            return None  # attention of different widths per layer (MiMo's sliding-window layers): per-layer config fields
    cfg = model.config
    if not all(isinstance(getattr(cfg, a, None), int) for a in ("hidden_size", "num_attention_heads")):
        return None
    return {role: n for role, n in found.items() if n is not None}


def _probe(model: nn.Module, changes: dict[str, Any]) -> nn.Module | None:
    """The model's class built on the meta device (no memory, no arithmetic, the caller's RNG
    untouched) from a copy of its config with the fields ``changes`` set, or None when the config
    refuses a value (read-only, validated) or the class the config: no probe."""
    cfg = copy.deepcopy(model.config)
    try:
        for k, v in changes.items():
            setattr(cfg, k, v)
        with torch.device("meta"), torch.random.fork_rng(devices=[]):
            return type(model)(cfg)
    except Exception:  # noqa: BLE001 - whatever the config or the class refuses, the probe failed
        return None


def _layer_shapes(model: nn.Module, layers: str) -> dict[str, tuple[int, ...]]:
    prefix = layers + "."
    return {n[len(prefix):]: tuple(p.shape) for n, p in model.named_parameters() if n.startswith(prefix)}


def _changed_dims(base: dict[str, tuple[int, ...]], probe: nn.Module, layers: str) -> dict[str, dict[int, int]]:
    """Per tensor of the probe's layers (name inside ``layers``: ``0.mlp.down_proj.weight``), the
    dims whose size differs from ``base``, with their new size."""
    out: dict[str, dict[int, int]] = {}
    for name, shape in _layer_shapes(probe, layers).items():
        old = base.get(name)
        if old is not None and len(old) == len(shape):
            diff = {d: b for d, (a, b) in enumerate(zip(old, shape)) if a != b}
            if diff:
                out[name] = diff
    return out


def _relative(name: str) -> tuple[int, str] | None:
    layer, _, rel = name.partition(".")
    return (int(layer), rel) if layer.isdigit() else None


def _mlp_widths(model: nn.Module, layers: str,
                sized: dict[str, frozenset] | None = None) -> dict[str, dict[int, tuple[str, int]]]:
    """Which config fields size which MLP tensors, measured: each candidate field (:data:`_INTERMEDIATE`
    and int fields named like it) is set to a new value on a copy of the config, the class is built
    on the meta device, and the tensors of the decoder layers that take exactly that size are read.

    Returns ``{field: {layer: (tensor name inside the layer, dim)}}`` for the fields that size
    something: LLaMA ``intermediate_size`` -> ``mlp.down_proj.weight`` dim 1 in every layer; Mixtral
    ``intermediate_size`` -> ``mlp.experts.down_proj`` dim 2; Qwen2-MoE ``moe_intermediate_size``
    (the experts), ``shared_expert_intermediate_size`` (the shared expert) and ``intermediate_size``
    (its dense layers, if any). A field whose default is None (GPT-J's ``n_inner``) is probed too.
    ``sized`` (when given) receives, per field, every ``(tensor inside the layer, dim)`` it resizes
    (the fused ``gate_up_proj``'s too), which :func:`layout_for` checks the groups against."""
    cfg = model.config
    base = _layer_shapes(model, layers)
    values = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    fields = [f for f in dict.fromkeys(_INTERMEDIATE + tuple(values)) if hasattr(cfg, f)
              and (f in _INTERMEDIATE or _WIDTH_FIELD.search(f))]
    out: dict[str, dict[int, tuple[str, int]]] = {}
    for f in fields:
        v = getattr(cfg, f, None)
        if isinstance(v, bool) or not (v is None or isinstance(v, int) and v > 0):
            continue
        new = 2 * v if v else 3 * int(cfg.hidden_size) + 8  # a size no other width of the model has
        probe = _probe(model, {f: new})
        if probe is None:
            continue
        found: dict[int, tuple[str, int]] = {}
        every = set()
        for name, diff in _changed_dims(base, probe, layers).items():
            where = _relative(name)
            if where is None:
                continue
            for d, b in diff.items():
                every.add((where[1], d))
                if b == new:
                    found.setdefault(where[0], (where[1], d))
        if found and not _sizes_linearly(model, layers, f, new - 24, found):
            continue  # the class rounds the field (LFM2's multiple_of): a pruned width is not what it builds
        if found:
            out[f] = found
            if sized is not None:
                sized[f] = frozenset(every)
    return out


def _sizes_linearly(model: nn.Module, layers: str, f: str, value: int, found: dict[int, tuple[str, int]]) -> bool:
    """Whether the class builds the tensors ``found`` at exactly ``value`` when the field is set to it
    (a second probe point, off any power of two)."""
    probe = _probe(model, {f: value})
    if probe is None:
        return False
    shapes = _layer_shapes(probe, layers)
    return all((shapes.get(f"{i}.{rel}") or ())[d:d + 1] == (value,) for i, (rel, d) in found.items())


def _resized(model: nn.Module, probe: nn.Module | None, layers: str) -> frozenset:
    """Every ``(tensor inside a layer, dim)`` whose size differs between ``model`` and its
    :func:`_probe` (empty without a probe)."""
    if probe is None:
        return frozenset()
    out = set()
    for name, diff in _changed_dims(_layer_shapes(model, layers), probe, layers).items():
        where = _relative(name)
        if where is not None:
            out.update((where[1], d) for d in diff)
    return frozenset(out)


def _heads_sized(model: nn.Module, layers: str, head_dim: int, kv_too: bool = True) -> frozenset:
    """What follows the number of heads (query heads, and with ``kv_too`` key/value heads, doubled
    at a fixed ``head_dim``): what a pruned heads group may resize (with ``kv_too``), or must (query
    heads only: pruning the query heads of one KV head leaves the keys and values)."""
    cfg = model.config
    changes = {"num_attention_heads": 2 * cfg.num_attention_heads, "head_dim": head_dim}
    if kv_too and isinstance(getattr(cfg, "num_key_value_heads", None), int):
        changes["num_key_value_heads"] = 2 * cfg.num_key_value_heads
    return _resized(model, _probe(model, changes), layers)


def _head_dim_free(model: nn.Module, wide: nn.Module | None, layers: str, o_proj: str, head_dim: int) -> bool:
    """Whether the model's class sizes its attention by ``config.head_dim`` rather than by
    ``hidden_size // num_attention_heads``: ``wide`` is its :func:`_probe` with twice the hidden size
    and ``head_dim`` set, whose output projection is read. A class that cannot be built that way
    (Falcon's read-only ``head_dim``) is treated as derived (tied)."""
    if wide is None:
        return False
    o = wide.get_submodule(f"{layers}.0.{o_proj}").weight
    return tuple(o.shape) == (2 * model.config.hidden_size, model.config.num_attention_heads * head_dim)


def _heads_divide_hidden(cfg: Any) -> bool:
    """Whether ``cfg``'s validation (``save_pretrained`` runs it; so does ``from_pretrained``)
    rejects a hidden size that is not a multiple of ``num_attention_heads``, as LLaMA's and Gemma 3's
    do even where ``head_dim`` is explicit. Measured on copies of the config, not assumed."""
    validate = getattr(cfg, "validate", None) or getattr(cfg, "validate_architecture", None)
    hidden, heads = getattr(cfg, "hidden_size", None), getattr(cfg, "num_attention_heads", None)
    if validate is None or not isinstance(hidden, int) or not isinstance(heads, int):
        return False
    odd = next((q for q in range(heads - 1, 1, -1) if hidden % q), None)
    if odd is None:
        return False

    def passes(q: int) -> bool:
        c = copy.deepcopy(cfg)
        c.num_attention_heads = q
        if isinstance(getattr(c, "num_key_value_heads", None), int):
            c.num_key_value_heads = 1
        try:
            (getattr(c, "validate", None) or c.validate_architecture)()
        except Exception:  # noqa: BLE001 - any refusal of the probe config counts
            return False
        return True

    return passes(heads) and not passes(odd)


def _float_attrs(model: nn.Module) -> dict[str, float]:
    return {f"{path}.{k}" if path else k: v for path, mod in model.named_modules() for k, v in vars(mod).items()
            if isinstance(v, float)}


def _hidden_constants(model: nn.Module) -> tuple[str, ...]:
    """Python float attributes of the model's modules that change with the hidden size (nGPT-style
    ``hidden_size ** 0.5`` scales): measured on a meta-device build with twice the hidden size and
    twice the heads (so a derived head_dim stays). A pruned residual would change them in the rebuilt
    model, so its width stays whole."""
    cfg = model.config
    changes = {"hidden_size": 2 * cfg.hidden_size, "num_attention_heads": 2 * cfg.num_attention_heads}
    if isinstance(getattr(cfg, "num_key_value_heads", None), int):
        changes["num_key_value_heads"] = 2 * cfg.num_key_value_heads
    probe = _probe(model, changes)
    if probe is None:
        return ()
    base, new = _float_attrs(model), _float_attrs(probe)
    return tuple(sorted(k for k, v in base.items() if k in new and not math.isclose(new[k], v, rel_tol=1e-9)))


def _embedding_scale(model: nn.Module) -> float | None:
    """The factor the input embeddings are multiplied by when it follows the hidden size in the
    class (Gemma's ``sqrt(hidden_size)``: a pruned residual width would change it), else None."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for holder, attr in ((emb, "scalar_embed_scale"), (emb, "embed_scale"), (getattr(model, "model", None), "embed_scale")):
        v = getattr(holder, attr, None) if holder is not None else None
        if v is None:
            continue
        try:
            v = float(v)
        except (TypeError, ValueError, RuntimeError):
            continue
        if v != 1.0:
            return v
    if getattr(model.config, "scale_embedding", False):
        return float(model.config.hidden_size) ** 0.5
    return None


def source_of(model: nn.Module, args: tuple = (), kwargs: dict | None = None) -> HFSource | None:
    """An :class:`HFSource` for a Hugging Face model fxprune can rebuild (a family in
    :data:`FAMILIES`, or any model whose layers are named like LLaMA's), else None. A config that
    refuses to be read the usual way (Gemma 4's per-layer ``head_dim``) means None, never an error:
    the model still compiles, only ``to_hf()`` is unavailable."""
    if not _is_hf(model):
        return None
    try:
        return _source_of(model, args, kwargs)
    except Exception as err:  # noqa: BLE001 - detection is best effort; compile must not fail on it
        logger.debug("to_hf() unavailable for %s: %s: %s", type(model).__name__, type(err).__name__, err)
        return None


def _source_of(model: nn.Module, args: tuple, kwargs: dict | None) -> HFSource | None:
    cfg = getattr(model, "config", None)
    family = FAMILIES.get(getattr(cfg, "model_type", None))  # None: any decoder whose layers _layer_names reads
    found = _layers_path(model)
    if found is None:
        return None
    layers, n = found
    names: dict[str, str] = {}
    sized: dict[str, frozenset] = {}
    if family != "gpt2":
        names = _layer_names(model, layers) or {}
        if not names:
            return None
        family = "llama"
    widths = _mlp_widths(model, layers, sized)
    if not widths:
        return None
    if family == "gpt2":
        head_dim = cfg.n_embd // cfg.n_head
        free = False
    else:
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        wide = _probe(model, {"hidden_size": 2 * cfg.hidden_size, "head_dim": head_dim})  # heads and head_dim fixed
        free = _head_dim_free(model, wide, layers, names["o"], head_dim)
        if free:
            sized["heads"] = _heads_sized(model, layers, head_dim)
            sized["heads:required"] = _heads_sized(model, layers, head_dim, kv_too=False)
            sized["hidden"] = _resized(model, wide, layers)  # what pruning the residual stream may resize
    example = dict(kwargs or {})
    if args:
        try:
            params = [p.name for p in inspect.signature(model.forward).parameters.values()]
        except (TypeError, ValueError):
            params = []
        for i, a in enumerate(args):
            if i < len(params):
                example[params[i]] = a
    gen = getattr(model, "generation_config", None)
    return HFSource(type(model), copy.deepcopy(cfg), copy.deepcopy(gen), family, layers, n, int(head_dim), example,
                    head_dim_free=free, embed_scale=_embedding_scale(model), names=names, widths=widths, sized=sized,
                    hidden_constants=_hidden_constants(model),
                    heads_divide_hidden=_heads_divide_hidden(cfg))


# ------------------------------------------------------------------------------------ layout

def _layer_of(path: str, layers: str) -> int | None:
    m = re.match(re.escape(layers) + r"\.(\d+)(\.|$)", path)
    return int(m.group(1)) if m else None


def _role(group, src: HFSource) -> tuple[str, int | None]:
    """("hidden" | "heads" | "mlp" | "other", layer index) of a dependency group."""
    layer_ids = {_layer_of(m, src.layers) for m in group.members}
    inside = {i for i in layer_ids if i is not None}
    if None in layer_ids and inside:
        return "hidden", None
    if len(inside) != 1:
        return "other", None
    (i,) = inside
    if group.kind == "heads":
        return "heads", i
    mlp = ("mlp.", "feed_forward.", "ffn.", ".fc1", ".fc2")
    if group.kind == "channels" and all(any(s in m for s in mlp) for m in group.members):
        return "mlp", i
    return "other", i


def _width_field(group, src: HFSource, layer: int) -> str | None:
    """The config field that sizes ``group`` (a group inside one layer): the field that resizes a
    tensor of one of the group's layers (:func:`_mlp_widths`)."""
    members = set(group.members)
    for f, per_layer in src.widths.items():
        if layer not in per_layer:
            continue
        tensors = {rel for rel, _ in src.sized.get(f, ())} | {per_layer[layer][0]}
        if any(f"{src.layers}.{layer}.{rel}".rsplit(".", 1)[0] in members for rel in tensors):
            return f
    return None


def _queries_per_unit(cfg: Any, heads_group: Any) -> int:
    """Query heads per unit of a per-layer heads group: a KV head's share under grouped-query
    attention, 1 where heads are pruned one by one (multi-head, or one KV head's query heads).
    (GPT-2's config maps ``num_attention_heads`` to ``n_head``.)"""
    return max(cfg.num_attention_heads // heads_group.n, 1)


def _dividing_widths(width: int, n_q: int, units: int, hidden_free: bool) -> tuple[tuple[int, ...], int]:
    """Keep counts of a heads group of ``units`` units (``n_q // units`` query heads each) and the
    step of the residual width such that every pair satisfies ``hidden % query_heads == 0`` (the
    config's own validation), chosen independently so the policies keep their freedom:

    * query-head counts that divide ``width`` (the residual's full size is always allowed), taken
      from the most heads down while the least common multiple ``step`` of those taken stays at or
      under ``max(n_q, width // 16)``;
    * the residual: multiples of ``step`` (every taken head count divides it).

    With the residual whole (``hidden_free`` False) every head count dividing ``width`` is allowed.
    LLaMA-3-8B (4096, 32 query heads in 8 KV groups): 4, 8, 16, 32 heads and multiples of 32 channels;
    a 384-wide model of 6 heads: 1, 2, 3, 4, 6 heads and multiples of 12 channels."""
    r = max(n_q // units, 1)
    counts = [k for k in range(units, 0, -1) if width % (k * r) == 0]
    if not hidden_free:
        return tuple(sorted(counts)), width
    cap = max(n_q, width // 16)
    step, taken = 1, []
    for k in counts:
        m = math.lcm(step, k * r)
        if m <= cap:
            step, taken = m, taken + [k]
    return tuple(sorted(taken)), step


def _misfits(gs: Sequence, src: HFSource, role: str, keys: Sequence | None) -> list[str]:
    """Where the groups ``gs`` (one role) and the config disagree: tensor dims of the groups that
    the config does not resize with that role, and tensor dims it resizes with it that the groups
    do not prune (they would change in the rebuilt model and not in the pruned graph)."""
    sized = src.sized.get(role)
    required = src.sized.get(role + ":required", sized)
    if keys is None or not sized:
        return []
    prefix = src.layers + "."
    pruned = {}
    for g in gs:
        for s in g.spaces:
            key = keys[s]
            if key[0] == "p" and str(key[1]).startswith(prefix):
                where = _relative(str(key[1])[len(prefix):])
                if where is not None:
                    pruned[(where[1], int(key[2]))] = f"{key[1]} dim {key[2]}"
    layers = {str(k[1])[len(prefix):].partition(".")[0] for g in gs for s in g.spaces
              if (k := keys[s])[0] == "p" and str(k[1]).startswith(prefix)}
    out = [f"{label} (its config does not resize it with {role})" for d, label in pruned.items() if d not in sized]
    out += [f"{src.layers}.{i}.{rel} dim {d} (the config resizes it with {role}, the plan does not)"
            for rel, d in sorted(required - set(pruned)) for i in sorted(layers)[:1]]
    return sorted(out)


def layout_for(src: HFSource, groups: Sequence, keys: Sequence | None = None) -> Layout:
    """Ties and whole groups that make every plan expressible in ``src``'s config (see module doc).

    ``groups``: the dependency groups (``fxprune.passes.dependency_groups.Group``); ``keys``: the
    dependency graph's space keys, to check every tensor dim of a group against what the config
    resizes with its role (:attr:`HFSource.sized`): a group the config cannot express is left whole.
    """
    out = Layout()
    name = src.cls.__name__
    # "heads", or the config field of an MLP width ("intermediate_size", "moe_intermediate_size", ...)
    by_role: dict[str, dict[int, list]] = {"heads": {}}
    hidden = []
    for g in groups:
        role, layer = _role(g, src)
        if role != "hidden" and role != "heads" and layer is not None:
            role = _width_field(g, src, layer) or role
        if role == "hidden":
            hidden.append(g)
        elif role == "heads" and layer not in by_role["heads"] or role in src.widths:
            by_role.setdefault(role, {}).setdefault(layer, []).append(g)  # a field may size several groups
        else:
            out.fixed[g.id] = f"{name}'s config has no width for this group"
    complete: dict[str, list] = {}
    mults: dict[int, int] = {}
    for role, per_layer in by_role.items():
        gs = [g for i in sorted(per_layer) for g in per_layer[i]]
        shapes = {tuple(sorted(g.n for g in per_layer[i])) for i in per_layer}
        expected = src.n_layers if role == "heads" else len(src.widths[role])
        misfit = _misfits(gs, src, role, keys)
        lead = min(gs, key=lambda g: g.n) if gs else None
        # several groups of one field in a layer (an MoE layer's shared expert) keep proportional counts
        proportional = lead is not None and all(g.n % lead.n == 0 for g in gs)
        if misfit:
            for g in gs:
                out.fixed[g.id] = (f"{name}'s config cannot express pruning {misfit[0]}"
                                   + (f" (and {len(misfit) - 1} more tensor dims)" if len(misfit) > 1 else ""))
        elif len(per_layer) == expected and len(shapes) == 1 and proportional:
            complete[role] = sorted(gs, key=lambda g: g.n)
            mults.update({g.id: g.n // lead.n for g in gs})
        elif not proportional:
            for g in gs:
                out.fixed[g.id] = (f"{name}'s config sizes groups of {sorted({g.n for g in gs})} channels with one "
                                   f"{role}, which no common keep count can express")
        else:
            for g in gs:
                out.fixed[g.id] = (f"{name}'s config has one {role} width for all layers and only {len(per_layer)} "
                                   f"of {expected} layers can be pruned alike")
    misfit = _misfits(hidden, src, "hidden", keys) if len(hidden) == 1 else []
    if misfit:
        out.fixed[hidden[0].id] = f"{name}'s config cannot express pruning the residual: {misfit[0]}"
        hidden = []
    if len(hidden) > 1:
        for g in hidden:
            out.fixed[g.id] = f"the residual stream of {name} splits into {len(hidden)} groups"
        hidden = []
    cfg = src.config
    if hidden and src.embed_scale is not None:
        for g in hidden:
            out.fixed[g.id] = (f"{name} multiplies its input embeddings by {src.embed_scale:.4g}, which it derives from "
                               "hidden_size: a pruned residual width would change that factor in the rebuilt model")
        hidden = []
    if hidden and src.hidden_constants:
        c = src.hidden_constants
        for g in hidden:
            out.fixed[g.id] = (f"{name} derives {c[0]}" + (f" (and {len(c) - 1} more constants)" if len(c) > 1 else "")
                               + " from hidden_size: a pruned residual width would change it in the rebuilt model")
        hidden = []
    if not src.head_dim_free:
        # head_dim = hidden_size // num_attention_heads: the residual keeps head_dim channels per kept query head
        heads = complete.pop("heads", None)
        mult = src.head_dim * (_queries_per_unit(cfg, heads[0]) if heads else 1)
        what = ("GPT-2: n_embd = n_head * head_dim in every layer" if src.family == "gpt2" else
                f"{name}: hidden_size = num_attention_heads * head_dim (its attention derives head_dim from them)")
        if heads and hidden and hidden[0].n == mult * heads[0].n:
            out.ties.append(Tie(tuple((g.id, 1) for g in heads) + ((hidden[0].id, mult),), what))
        else:
            for g in (heads or []) + hidden:
                out.fixed[g.id] = (f"{name}'s config ties the attention width to the residual width "
                                   "(hidden_size = num_attention_heads * head_dim), and one of them is kept whole")
            hidden = []
    heads = complete.get("heads")
    if heads and src.heads_divide_hidden:  # (with head_dim derived, the tie above already keeps it)
        ok, step = _dividing_widths(int(cfg.hidden_size), cfg.num_attention_heads, heads[0].n, bool(hidden))
        for g in heads:
            out.allowed[g.id] = ok
        r = _queries_per_unit(cfg, heads[0])
        kept = f"the heads keep one of {[k * r for k in ok]} query heads per layer"
        if hidden:
            for g in hidden:
                out.allowed[g.id] = tuple(range(step, g.n + 1, step))
            kept += f" and the residual a multiple of {step} channels"
        out.notes.append(f"layer_uniform: {name}'s config requires hidden_size ({cfg.hidden_size}) to be a multiple of "
                         f"num_attention_heads, so {kept}: every pair divides")
    for role, gs in complete.items():
        if len(gs) > 1:
            out.ties.append(Tie(tuple((g.id, mults.get(g.id, 1)) for g in gs), f"{name}: one {role} width for every layer"))
    if out.ties:
        out.notes.append(f"layer_uniform: {sum(len(t.members) for t in out.ties)} groups decided as {len(out.ties)} "
                         f"(the same keep count in every layer), so {name}'s config can express the plan")
    out.notes.append(f"{name}: result.to_hf() rebuilds the pruned model as a {name} (generate with the KV cache, "
                     "save_pretrained)")
    if out.fixed:
        why = sorted(set(out.fixed.values()))
        out.notes.append(f"layer_uniform: {len(out.fixed)} group(s) left whole ({name}'s config cannot express "
                         f"them otherwise): " + "; ".join(why[:4]) + ("; ..." if len(why) > 4 else ""))
    return out


# ------------------------------------------------------------------------------------ config

def _tensors(gm: nn.Module) -> dict[str, torch.Tensor]:
    out = dict(gm.named_parameters(remove_duplicate=False))
    for n, b in gm.named_buffers(remove_duplicate=False):
        out.setdefault(n, b)
    return out


def _shape(t: dict[str, torch.Tensor], name: str) -> tuple[int, ...] | None:
    v = t.get(name)
    return tuple(v.shape) if v is not None else None


def _uniform(values: list[tuple], what: str, name: str) -> tuple:
    if len(set(values)) != 1:
        raise ConfigError(
            f"the pruned {name} has different {what} per layer ({sorted(set(values))}), which its config cannot "
            "express. Compile with layer_uniform=True (the default for Hugging Face models) to get a plan that "
            "to_hf() can rebuild; the GraphModule in result.model runs either way.")
    return values[0]


def hf_config_for(src: HFSource, gm: nn.Module) -> Any:
    """The config of ``src``'s class that describes the pruned graph ``gm`` (widths read off its tensors)."""
    t = _tensors(gm)
    cfg = copy.deepcopy(src.config)
    name = src.cls.__name__
    hd = src.head_dim
    if src.family == "gpt2":
        dims = []
        for i in range(src.n_layers):
            p = f"{src.layers}.{i}"
            c_attn, c_proj, c_fc = (_shape(t, f"{p}.{m}.weight") for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc"))
            if None in (c_attn, c_proj, c_fc):
                raise ExportError(f"the pruned graph has no Conv1D weights under {p}; cannot rebuild {name}")
            dims.append((c_attn[0], c_proj[0], c_fc[1]))
        n_embd, attn, inner = _uniform(dims, "widths", name)
        if attn != n_embd or attn % hd:
            raise ConfigError(
                f"{name}'s config ties the attention width to the residual width (n_embd = n_head * head_dim); the "
                f"pruned graph has {attn} attention and {n_embd} residual channels. Compile with layer_uniform=True.")
        cfg.n_embd, cfg.n_head, cfg.n_inner = n_embd, attn // hd, inner
        return cfg
    dims = []
    nm = src.names
    for i in range(src.n_layers):
        p = f"{src.layers}.{i}"
        o, q, k, qkv = (_shape(t, f"{p}.{nm[r]}.weight") if r in nm else None for r in ("o", "q", "k", "qkv"))
        if o is None or (q is None and qkv is None):
            raise ExportError(f"the pruned graph has no attention projections under {p}; cannot rebuild {name}")
        q_out = o[1]
        kv_out = k[0] if k is not None else (qkv[0] - q_out) // 2
        hidden = (q or qkv)[1]
        dims.append((hidden, q_out, kv_out))
    hidden, q_out, kv_out = _uniform(dims, "widths", name)
    mlp = {}
    for f, per_layer in src.widths.items():
        sizes = []
        for i, (rel, d) in sorted(per_layer.items()):
            shape = _shape(t, f"{src.layers}.{i}.{rel}")
            if shape is None:
                raise ExportError(f"the pruned graph has no tensor {src.layers}.{i}.{rel}; cannot rebuild {name}")
            sizes.append((shape[d],))
        (mlp[f],) = _uniform(sizes, f"{f} widths", name)
    if q_out % hd or kv_out % hd or (q_out // hd) % (kv_out // hd):
        raise ConfigError(f"the pruned {name} has {q_out} query and {kv_out} key/value channels, not whole heads of "
                          f"{hd} in groups; its config cannot express that")
    if not src.head_dim_free and hidden != q_out:
        raise ConfigError(
            f"{name} derives head_dim from hidden_size // num_attention_heads, so its config cannot express "
            f"{q_out} query channels with a residual width of {hidden}. Compile with layer_uniform=True (the default "
            "for Hugging Face models), which keeps the two tied.")
    if getattr(cfg, "word_embed_proj_dim", None) == src.config.hidden_size:  # OPT: embeddings as wide as the stream
        cfg.word_embed_proj_dim = hidden
    cfg.hidden_size = hidden
    cfg.num_attention_heads = q_out // hd
    kv = kv_out // hd
    if getattr(cfg, "num_key_value_heads", q_out // hd) != kv:
        for field_name in ("num_key_value_heads", "num_kv_heads"):  # Falcon's is a property over num_kv_heads
            try:
                setattr(cfg, field_name, kv)
            except AttributeError:
                continue
            if getattr(cfg, "num_key_value_heads", kv) == kv:
                break
        else:
            raise ConfigError(f"the pruned {name} has {q_out} query and {kv_out} key/value channels, and its config "
                              "cannot express that number of key/value heads")
    if src.head_dim_free:
        cfg.head_dim = hd
    for f, width in mlp.items():
        setattr(cfg, f, width)
    return cfg


# ------------------------------------------------------------------------------------ rebuild

def _first_tensor(out: Any) -> torch.Tensor:
    from fxprune.importance import output_tensor

    logits = getattr(out, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else output_tensor(out)


def rebuild(src: HFSource, gm: nn.Module, *, verify: bool = True) -> nn.Module:
    """The pruned graph ``gm`` as an instance of ``src.cls`` (see :func:`to_hf`)."""
    name = src.cls.__name__
    try:
        cfg = hf_config_for(src, gm)
    except FxpruneError:
        raise
    except Exception as err:  # noqa: BLE001 - a config class validating on assignment (strict dataclasses)
        raise ConfigError(f"{name}'s config refuses the pruned widths ({type(err).__name__}: "
                          f"{_first_line(err)}), so to_hf() cannot rebuild it; result.model (a GraphModule) is the "
                          "pruned model.") from err
    tensors = _tensors(gm)
    dtype = next((v.dtype for v in tensors.values() if v.is_floating_point()), torch.float32)
    device = next((v.device for v in tensors.values()), torch.device("cpu"))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = src.cls(cfg)
    except Exception as err:  # noqa: BLE001 - the class's own validation of the pruned widths
        raise ConfigError(f"{name} refuses the pruned config ({type(err).__name__}: {_first_line(err)}), so to_hf() "
                          "cannot rebuild it; result.model (a GraphModule) is the pruned model. Keeping the "
                          "offending widths whole (ignore=[...]) or another budget may give a config it accepts."
                          ) from err
    model.to(device=device, dtype=dtype)
    state = model.state_dict()
    load = {k: v for k, v in tensors.items() if k in state}
    misfit = [f"{k} {tuple(v.shape)} (the config gives {tuple(state[k].shape)})" for k, v in load.items()
              if tuple(v.shape) != tuple(state[k].shape)]
    if misfit:
        raise ConfigError(
            f"{name}'s config cannot express the pruned widths of {len(misfit)} tensor(s): " + "; ".join(misfit[:3])
            + ". The class sizes them by another config field than the one fxprune pruned them with. result.model "
            "(a GraphModule) is the pruned model; to get a rebuildable plan, keep those layers whole with "
            "ignore=[...].")
    missing, _ = model.load_state_dict(load, strict=False)
    loaded = {id(t) for n, t in model.named_parameters(remove_duplicate=False) if n in load}
    loaded |= {id(t) for n, t in model.named_buffers(remove_duplicate=False) if n in load}
    every = dict(model.named_parameters(remove_duplicate=False))
    every.update(dict(model.named_buffers(remove_duplicate=False)))
    untied = [k for k in missing if k in every and id(every[k]) not in loaded]
    if untied:
        raise ExportError(f"the pruned graph has no tensors for {untied[:5]} of {src.cls.__name__}; cannot rebuild it")
    model.config.use_cache = getattr(src.config, "use_cache", True)
    if src.generation_config is not None:
        model.generation_config = copy.deepcopy(src.generation_config)
    model.eval()
    if verify and src.example:
        _check_logits(model, gm, src)
    return model


def _check_logits(model: nn.Module, gm: nn.Module, src: HFSource) -> None:
    example = {k: v.to(next(model.parameters()).device) for k, v in src.example.items()}
    with torch.no_grad():
        want = _first_tensor(gm(**example)).float()
        got = _first_tensor(model(**example, use_cache=False)).float()
    if got.shape != want.shape:
        raise PostconditionError(f"the rebuilt {src.cls.__name__} returns {tuple(got.shape)}, the pruned graph "
                                 f"{tuple(want.shape)}")
    diff = (got - want).abs().max().item()
    scale = want.abs().max().item()
    if not diff <= 1e-5 + 1e-4 * scale:
        raise PostconditionError(
            f"the rebuilt {src.cls.__name__} differs from the pruned graph by {diff:.3g} (logits up to {scale:.3g}) "
            "on the example inputs. This is a bug in fxprune: please report it; result.model is unaffected.")


def to_hf(result: Any, *, verify: bool = True) -> nn.Module:
    """The pruned model of ``fxprune.compile(hf_model, ...)`` as an instance of the original class.

    The config is a copy of the original with the pruned widths; the weights are the pruned
    graph's (tied weights stay tied). With ``verify`` the logits on the example inputs are checked
    against ``result.model``. Each call builds a new model.

    Raises:
        ConfigError: the model is not a Hugging Face model of a supported family, or the plan
            has per-layer widths (compiled with ``layer_uniform=False``).
        ExportError / PostconditionError: the rebuild failed (a bug: please report it).
    """
    src = getattr(result, "hf_source", None)
    if src is None:
        raise ConfigError(
            "to_hf() needs a Hugging Face decoder fxprune can rebuild: GPT-2, or one whose layers all have query "
            "and key (or fused q/k/v) and attention-output projections fxprune knows by name (LLaMA's "
            "self_attn.q_proj/k_proj/o_proj, as in Mistral, Qwen, Gemma, Phi, OLMo, GPT-NeoX, OPT, Mixtral, ...) "
            "and a config with hidden_size, num_attention_heads and a field that sizes the MLP; this result came "
            "from another model (or one with layers of several kinds, or latent attention). result.model (a "
            "GraphModule) runs, trains, saves with fxprune.save and exports to ONNX.")
    if src.refused:
        raise ConfigError(src.refused)
    return rebuild(src, result.model, verify=verify)


def save_pretrained(result: Any, directory: str | os.PathLike, **kwargs: Any) -> Path:
    """``result.to_hf().save_pretrained(directory)``, file by file atomically (written to a
    temporary directory next to it, then each file moved in with ``os.replace``).

    ``AutoModelForCausalLM.from_pretrained(directory)`` (or ``AutoModel`` for a base model) loads it
    back. Extra keyword arguments go to ``save_pretrained``.
    """
    model = result.to_hf() if not isinstance(result, nn.Module) else result
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{directory.name}.", dir=directory.parent) as tmp:
        model.save_pretrained(tmp, **kwargs)
        for src in sorted(Path(tmp).rglob("*")):
            if src.is_file():
                dst = directory / src.relative_to(tmp)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(src, default_file_mode())
                os.replace(src, dst)
    return directory
