"""ONNX export of a causal language model with a KV cache, and greedy generation on ONNX Runtime.

:func:`export_decoder_onnx` exports a Hugging Face causal LM (a pruned one from
``result.to_hf()``, or a :class:`~fxprune.CompileResult` directly) as one ONNX graph that serves
both the prompt and every following step:

========================================  ===========================================================
inputs                                    ``input_ids [batch, new]`` (int64),
                                          ``attention_mask [batch, past + new]`` (int64, 1 = token),
                                          ``past_key_values.{i}.key`` / ``.value``
                                          ``[batch, kv_heads, past, head_dim]`` per layer (``past`` may
                                          be 0: the first call)
outputs                                   ``logits [batch, new, vocab]``,
                                          ``present.{i}.key`` / ``.value`` ``[batch, kv_heads, past +
                                          new, head_dim]`` (the next call's past)
========================================  ===========================================================

Position ids are computed in the graph from the attention mask (``cumsum - 1``), so left padding
works. The graph is traced by the TorchScript exporter through the model's own forward with a
``DynamicCache`` built from the past tensors.

:class:`OrtDecoder` runs that file on ONNX Runtime: :meth:`OrtDecoder.generate` is a greedy loop
(prompt once, then one token per step with the returned presents as the next pasts).
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from fxprune._io import atomic_path
from fxprune.errors import ConfigError, ExportError

__all__ = ["export_decoder_onnx", "OrtDecoder", "kv_input_names"]

logger = logging.getLogger(__name__)


def _text_config(model: nn.Module) -> Any:
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def _kv_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, kv heads, head_dim) of a Hugging Face decoder config."""
    cfg = _text_config(model)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer")
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head")
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return int(layers), int(kv), int(head_dim)


def kv_input_names(n_layers: int) -> tuple[list[str], list[str]]:
    """ONNX input and output names of :func:`export_decoder_onnx` for ``n_layers`` layers."""
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", *past], ["logits", *present]


class _KVStep(nn.Module):
    """``(input_ids, attention_mask, *past) -> (logits, *present)`` around a Hugging Face decoder."""

    def __init__(self, model: nn.Module, n_layers: int):
        super().__init__()
        self.model = model
        self.n_layers = n_layers
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"

    def forward(self, input_ids, attention_mask, *past):
        from transformers import DynamicCache

        cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(self.n_layers)])
        new = input_ids.shape[1]
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new:]
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self.cache_arg: cache})
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        flat = []
        for layer in cache.layers:
            flat += [layer.keys, layer.values]
        return (out.logits, *flat)


def export_decoder_onnx(model: Any, path: str | os.PathLike, *, opset: int = 17) -> Path:
    """Export a causal LM with KV-cache inputs and outputs (see the module doc); returns the path.

    Args:
        model: a Hugging Face causal LM (``AutoModelForCausalLM`` class), or a ``CompileResult`` of
            one (its :meth:`~fxprune.CompileResult.to_hf` model is exported).
        path: the ``.onnx`` file to write (atomically).
        opset: ONNX opset.

    Raises:
        ConfigError: the model is not a Hugging Face causal LM.
        ExportError: the exporter failed.
    """
    if hasattr(model, "to_hf") and not isinstance(model, nn.Module):
        model = model.to_hf()
    if not isinstance(model, nn.Module) or not hasattr(model, "config") or not hasattr(model, "generate"):
        raise ConfigError(f"export_decoder_onnx needs a Hugging Face causal LM (or its CompileResult), got "
                          f"{type(model).__name__}; use fxprune.export_onnx for other models")
    n_layers, kv, head_dim = _kv_shape(model)
    step = _KVStep(model, n_layers).eval()
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    vocab = int(_text_config(model).vocab_size)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 3), generator=g).to(device)
    past_len = 4
    mask = torch.ones(2, past_len + 3, dtype=torch.long, device=device)
    past = [torch.randn(2, kv, past_len, head_dim, generator=g).to(device, dtype) for _ in range(2 * n_layers)]
    in_names, out_names = kv_input_names(n_layers)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "logits": {0: "batch", 1: "sequence"}}
    axes.update({n: {0: "batch", 2: "past_sequence"} for n in in_names[2:]})
    axes.update({n: {0: "batch", 2: "total_sequence"} for n in out_names[1:]})
    path = Path(path)
    try:
        with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about Python bools on sizes (checked by parity)
            torch.onnx.export(step, (ids, mask, *past), str(tmp), input_names=in_names, output_names=out_names,
                              dynamic_axes=axes, opset_version=opset, dynamo=False)
    except Exception as err:
        raise ExportError(f"ONNX export of {type(model).__name__} with a KV cache failed: {type(err).__name__}: "
                          f"{str(err).splitlines()[0][:300] if str(err) else ''}") from err
    return path


class OrtDecoder:
    """Greedy generation on ONNX Runtime with a file written by :func:`export_decoder_onnx`.

    Args:
        path: the ONNX file.
        providers: ONNX Runtime execution providers (default: CPU).
        threads: intra-op threads (0: ONNX Runtime's default).
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int = 0):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=list(providers or ["CPUExecutionProvider"]))
        inputs = self.session.get_inputs()
        self.input_names = [i.name for i in inputs]
        past = [i for i in inputs if i.name.startswith("past_key_values.")]
        if self.input_names[:2] != ["input_ids", "attention_mask"] or not past:
            raise ConfigError(f"{path} is not a KV-cache decoder from export_decoder_onnx (inputs {self.input_names[:4]})")
        self.n_layers = len(past) // 2
        shape = past[0].shape
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.dtype = np.float16 if "float16" in past[0].type else np.float32

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list[np.ndarray]
             ) -> tuple[np.ndarray, list[np.ndarray]]:
        """One forward: logits of the new tokens and the presents (the next step's pasts)."""
        feed = dict(zip(self.input_names, [input_ids.astype(np.int64), attention_mask.astype(np.int64), *past]))
        out = self.session.run(None, feed)
        return out[0], out[1:]

    def generate(self, input_ids: Any, max_new_tokens: int, *, attention_mask: Any = None,
                 eos_token_id: int | None = None) -> np.ndarray:
        """Greedy decoding: ``[batch, prompt + new]`` token ids (int64).

        Stops early when every sequence produced ``eos_token_id`` (finished sequences are then
        padded with it).
        """
        ids = np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids, dtype=np.int64)
        if ids.ndim != 2:
            raise ConfigError(f"input_ids must be [batch, sequence], got shape {ids.shape}")
        mask = (np.ones_like(ids) if attention_mask is None else
                np.asarray(attention_mask.cpu() if isinstance(attention_mask, torch.Tensor) else attention_mask,
                           dtype=np.int64))
        batch = ids.shape[0]
        past = [np.zeros((batch, self.kv_heads, 0, self.head_dim), self.dtype) for _ in range(2 * self.n_layers)]
        seq, cur = ids, ids
        done = np.zeros(batch, dtype=bool)
        for _ in range(int(max_new_tokens)):
            logits, past = self.step(cur, mask, past)
            nxt = logits[:, -1].argmax(-1)
            if eos_token_id is not None:
                nxt = np.where(done, eos_token_id, nxt)
                done |= nxt == eos_token_id
            cur = nxt[:, None].astype(np.int64)
            seq = np.concatenate([seq, cur], 1)
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], 1)
            if eos_token_id is not None and done.all():
                break
        return seq
