"""Hugging Face language models stay Hugging Face models.

``fxprune.compile`` works on a captured graph, so ``result.model`` is a ``torch.fx.GraphModule``
for every model (ONNX export, ``fxprune.save``, latency and ``count_macs`` treat all models
alike). For a Hugging Face causal LM of a family fxprune knows, :meth:`CompileResult.to_hf`
(:func:`to_hf`) rebuilds the pruned model as an instance of the *original class* with an updated
config (hidden size, heads, KV heads, ``head_dim``, intermediate size), so ``generate()`` with the
KV cache, ``save_pretrained`` and ``AutoModelForCausalLM.from_pretrained`` work as before.

A config has one width per kind of layer, so the plan must keep the same counts in every layer.
For these models :func:`layout_for` ties the groups that play the same role in every layer into
one decision variable (see :mod:`fxprune.tying`), which is on by default
(``compile(layer_uniform=None)``); groups the config cannot express are left whole:

==========================  =========================================================================
LLaMA, Mistral, Qwen2/3,    ``hidden_size`` (the residual stream), ``num_key_value_heads`` (a KV head
Phi-3                       is pruned with its query heads, so ``num_attention_heads`` follows),
                            ``intermediate_size``; ``head_dim`` is kept (and written to the config).
GPT-2                       the config ties the attention width to the residual width
                            (``n_embd = n_head * head_dim``, ``head_dim = n_embd // n_head``): the
                            heads of every layer and the residual stream are one variable (the
                            residual keeps ``head_dim`` channels per kept head); ``n_inner`` (MLP).
==========================  =========================================================================

The rebuilt model takes the pruned graph's tensors by their (unchanged) names and is checked
against the graph: the logits on the example inputs must agree.
"""

from __future__ import annotations

import copy
import inspect
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
from fxprune.errors import ConfigError, ExportError, PostconditionError
from fxprune.tying import Tie

__all__ = ["HFSource", "Layout", "source_of", "layout_for", "hf_config_for", "to_hf", "save_pretrained", "FAMILIES"]

#: ``config.model_type`` -> how fxprune rewrites the config.
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


@dataclass
class Layout:
    """Ties (one keep count for several groups) and groups left whole, with notes for the report."""

    ties: list[Tie] = field(default_factory=list)
    fixed: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


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


def source_of(model: nn.Module, args: tuple = (), kwargs: dict | None = None) -> HFSource | None:
    """An :class:`HFSource` for a Hugging Face model of a family in :data:`FAMILIES`, else None."""
    if not _is_hf(model):
        return None
    cfg = getattr(model, "config", None)
    family = FAMILIES.get(getattr(cfg, "model_type", None))
    found = _layers_path(model)
    if family is None or found is None:
        return None
    layers, n = found
    if family == "gpt2":
        head_dim = cfg.n_embd // cfg.n_head
    else:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    example = dict(kwargs or {})
    if args:
        try:
            names = [p.name for p in inspect.signature(model.forward).parameters.values()]
        except (TypeError, ValueError):
            names = []
        for i, a in enumerate(args):
            if i < len(names):
                example[names[i]] = a
    gen = getattr(model, "generation_config", None)
    return HFSource(type(model), copy.deepcopy(cfg), copy.deepcopy(gen), family, layers, n, int(head_dim), example)


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
    mlp = ("mlp.", "feed_forward.", "ffn.")
    if group.kind == "channels" and all(any(s in m for s in mlp) for m in group.members):
        return "mlp", i
    return "other", i


def layout_for(src: HFSource, groups: Sequence) -> Layout:
    """Ties and whole groups that make every plan expressible in ``src``'s config (see module doc).

    ``groups``: the dependency groups (``fxprune.passes.dependency_groups.Group``).
    """
    out = Layout()
    name = src.cls.__name__
    by_role: dict[str, dict[int, Any]] = {"heads": {}, "mlp": {}}
    hidden = []
    for g in groups:
        role, layer = _role(g, src)
        if role == "hidden":
            hidden.append(g)
        elif role in by_role and layer not in by_role[role]:
            by_role[role][layer] = g
        else:
            out.fixed[g.id] = f"{name}'s config has no width for this group"
    complete = {}
    for role, per_layer in by_role.items():
        gs = [per_layer[i] for i in sorted(per_layer)]
        sizes = {(g.n, g.unit) for g in gs}
        if len(gs) == src.n_layers and len(sizes) == 1:
            complete[role] = gs
        else:
            for g in gs:
                out.fixed[g.id] = (f"{name}'s config has one {role} width for all layers and only {len(gs)} of "
                                   f"{src.n_layers} layers can be pruned alike")
    if len(hidden) > 1:
        for g in hidden:
            out.fixed[g.id] = f"the residual stream of {name} splits into {len(hidden)} groups"
        hidden = []
    if src.family == "gpt2":
        heads = complete.pop("heads", None)
        if heads and hidden:
            out.ties.append(Tie(tuple((g.id, 1) for g in heads) + ((hidden[0].id, src.head_dim),),
                                "GPT-2: n_embd = n_head * head_dim in every layer"))
        else:
            for g in (heads or []) + hidden:
                out.fixed[g.id] = "GPT-2's config ties the attention width to the residual width"
    for role, gs in complete.items():
        if len(gs) > 1:
            out.ties.append(Tie(tuple((g.id, 1) for g in gs), f"{name}: one {role} width for every layer"))
    if out.ties:
        out.notes.append(f"layer_uniform: {sum(len(t.members) for t in out.ties)} groups decided as {len(out.ties)} "
                         f"(the same keep count in every layer), so {name}'s config can express the plan")
    out.notes.append(f"{name}: result.to_hf() rebuilds the pruned model as a {name} (generate with the KV cache, "
                     "save_pretrained)")
    if out.fixed:
        out.notes.append(f"layer_uniform: {len(out.fixed)} group(s) left whole ({name}'s config cannot express "
                         "them otherwise)")
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
    for i in range(src.n_layers):
        p = f"{src.layers}.{i}"
        o = _shape(t, f"{p}.self_attn.o_proj.weight")
        down = _shape(t, f"{p}.mlp.down_proj.weight")
        q = _shape(t, f"{p}.self_attn.q_proj.weight")
        k = _shape(t, f"{p}.self_attn.k_proj.weight")
        qkv = _shape(t, f"{p}.self_attn.qkv_proj.weight")
        if o is None or down is None or (q is None and qkv is None):
            raise ExportError(f"the pruned graph has no attention/MLP projections under {p}; cannot rebuild {name}")
        q_out = o[1]
        kv_out = k[0] if k is not None else (qkv[0] - q_out) // 2
        hidden = (q or qkv)[1]
        dims.append((hidden, q_out, kv_out, down[1]))
    hidden, q_out, kv_out, inter = _uniform(dims, "widths", name)
    if q_out % hd or kv_out % hd or (q_out // hd) % (kv_out // hd):
        raise ConfigError(f"the pruned {name} has {q_out} query and {kv_out} key/value channels, not whole heads of "
                          f"{hd} in groups; its config cannot express that")
    cfg.hidden_size = hidden
    cfg.num_attention_heads = q_out // hd
    cfg.num_key_value_heads = kv_out // hd
    cfg.head_dim = hd
    cfg.intermediate_size = inter
    return cfg


# ------------------------------------------------------------------------------------ rebuild

def _first_tensor(out: Any) -> torch.Tensor:
    from fxprune.importance import output_tensor

    logits = getattr(out, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else output_tensor(out)


def rebuild(src: HFSource, gm: nn.Module, *, verify: bool = True) -> nn.Module:
    """The pruned graph ``gm`` as an instance of ``src.cls`` (see :func:`to_hf`)."""
    cfg = hf_config_for(src, gm)
    tensors = _tensors(gm)
    dtype = next((v.dtype for v in tensors.values() if v.is_floating_point()), torch.float32)
    device = next((v.device for v in tensors.values()), torch.device("cpu"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = src.cls(cfg)
    model.to(device=device, dtype=dtype)
    state = model.state_dict()
    load = {k: v for k, v in tensors.items() if k in state}
    try:
        missing, _ = model.load_state_dict(load, strict=False)
    except RuntimeError as err:
        raise ExportError(f"the pruned graph's tensors do not fit a {src.cls.__name__} built from the updated config "
                          f"({str(err).splitlines()[0][:300]}). This is a bug in fxprune: please report it.") from err
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
            "to_hf() needs a Hugging Face model of a family fxprune can rebuild "
            f"({', '.join(sorted(FAMILIES))}); this result came from another model. result.model (a "
            "GraphModule) runs, trains, saves with fxprune.save and exports to ONNX.")
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
