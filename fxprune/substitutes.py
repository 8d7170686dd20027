"""Stand-ins for stock PyTorch modules that capture cannot trace or copy as they are.

Applied by :func:`fxprune.capture.capture` to its private copy of the model, before tracing:

* ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` / ``nn.TransformerEncoder`` /
  ``nn.TransformerDecoder`` / ``nn.Transformer`` are ``torch.nn`` modules, so torch.fx keeps them as
  opaque leaves, and their forward branches on tensor values (the "fast path" checks), so it could
  not be traced anyway. Each is replaced by a module that holds the *same* children (``self_attn``,
  ``linear1``, ``norm1`` ..., so module paths, ``state_dict`` keys and ``ignore=`` names do not
  change) and computes the documented slow path: ``x + SA(norm1(x))`` / ``norm1(x + SA(x))`` and
  so on, with the masks and ``is_causal`` hints handed to the attention modules (which capture then
  decomposes into q/k/v/out projections). The one difference: the stock encoder's nested-tensor
  fast path (eval mode, no autograd, a ``src_key_padding_mask``) returns zeros at padded positions,
  the slow path it documents as equivalent returns the computed values there; non-padded positions
  are the same.
* Weight re-parametrizations (``torch.nn.utils.weight_norm`` and ``spectral_norm`` hooks, and every
  ``torch.nn.utils.parametrize`` parametrization such as ``parametrizations.weight_norm``) are
  folded into a plain parameter holding the weight they compute. The pruned model computes the same
  function; it has no weight normalisation any more (a capture note says so), so re-apply it before
  fine-tuning if the training recipe needs it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["prepare_model", "TransformerEncoderLayerSlowPath", "TransformerDecoderLayerSlowPath",
           "TransformerEncoderSlowPath", "TransformerDecoderSlowPath", "TransformerSlowPath",
           "copy_memo"]


class TransformerEncoderLayerSlowPath(nn.Module):
    """``nn.TransformerEncoderLayer`` computed the way its docs define it (no fast path)."""

    def __init__(self, layer: nn.TransformerEncoderLayer):
        super().__init__()
        for name in ("self_attn", "linear1", "dropout", "linear2", "norm1", "norm2", "dropout1", "dropout2"):
            setattr(self, name, getattr(layer, name))
        self.activation = layer.activation  # a function or a module
        self.norm_first = bool(layer.norm_first)
        self.train(layer.training)

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal):
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=False,
                           is_causal=is_causal)[0]
        return self.dropout1(x)

    def _ff_block(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class TransformerDecoderLayerSlowPath(nn.Module):
    """``nn.TransformerDecoderLayer`` computed the way its docs define it."""

    def __init__(self, layer: nn.TransformerDecoderLayer):
        super().__init__()
        for name in ("self_attn", "multihead_attn", "linear1", "dropout", "linear2", "norm1", "norm2", "norm3",
                     "dropout1", "dropout2", "dropout3"):
            setattr(self, name, getattr(layer, name))
        self.activation = layer.activation
        self.norm_first = bool(layer.norm_first)
        self.train(layer.training)

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal: bool = False, memory_is_causal: bool = False):
        x = tgt
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), tgt_mask, tgt_key_padding_mask, tgt_is_causal)
            x = x + self._mha_block(self.norm2(x), memory, memory_mask, memory_key_padding_mask, memory_is_causal)
            x = x + self._ff_block(self.norm3(x))
        else:
            x = self.norm1(x + self._sa_block(x, tgt_mask, tgt_key_padding_mask, tgt_is_causal))
            x = self.norm2(x + self._mha_block(x, memory, memory_mask, memory_key_padding_mask, memory_is_causal))
            x = self.norm3(x + self._ff_block(x))
        return x

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal):
        x = self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal,
                           need_weights=False)[0]
        return self.dropout1(x)

    def _mha_block(self, x, mem, attn_mask, key_padding_mask, is_causal):
        x = self.multihead_attn(x, mem, mem, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                is_causal=is_causal, need_weights=False)[0]
        return self.dropout2(x)

    def _ff_block(self, x):
        return self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))


class TransformerEncoderSlowPath(nn.Module):
    """``nn.TransformerEncoder``: the layers in order, then the optional norm."""

    def __init__(self, encoder: nn.TransformerEncoder):
        super().__init__()
        self.layers = encoder.layers
        self.norm = encoder.norm
        self.num_layers = encoder.num_layers
        self.train(encoder.training)

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        output = src
        for mod in self.layers:
            output = mod(output, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                         is_causal=bool(is_causal))
        if self.norm is not None:
            output = self.norm(output)
        return output


class TransformerDecoderSlowPath(nn.Module):
    """``nn.TransformerDecoder``: the layers in order, then the optional norm."""

    def __init__(self, decoder: nn.TransformerDecoder):
        super().__init__()
        self.layers = decoder.layers
        self.norm = decoder.norm
        self.num_layers = decoder.num_layers
        self.train(decoder.training)

    def forward(self, tgt, memory, tgt_mask=None, memory_mask=None, tgt_key_padding_mask=None,
                memory_key_padding_mask=None, tgt_is_causal=None, memory_is_causal=False):
        output = tgt
        for mod in self.layers:
            output = mod(output, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                         tgt_key_padding_mask=tgt_key_padding_mask, memory_key_padding_mask=memory_key_padding_mask,
                         tgt_is_causal=bool(tgt_is_causal), memory_is_causal=bool(memory_is_causal))
        if self.norm is not None:
            output = self.norm(output)
        return output


class TransformerSlowPath(nn.Module):
    """``nn.Transformer``: encoder, then decoder on the encoder's memory."""

    def __init__(self, model: nn.Transformer):
        super().__init__()
        self.encoder = model.encoder
        self.decoder = model.decoder
        self.d_model = model.d_model
        self.nhead = model.nhead
        self.batch_first = model.batch_first
        self.train(model.training)

    def forward(self, src, tgt, src_mask=None, tgt_mask=None, memory_mask=None, src_key_padding_mask=None,
                tgt_key_padding_mask=None, memory_key_padding_mask=None, src_is_causal=None, tgt_is_causal=None,
                memory_is_causal=False):
        memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask, is_causal=src_is_causal)
        return self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                            tgt_key_padding_mask=tgt_key_padding_mask,
                            memory_key_padding_mask=memory_key_padding_mask, tgt_is_causal=tgt_is_causal,
                            memory_is_causal=memory_is_causal)


_SLOW_PATHS: dict[type, type] = {
    nn.TransformerEncoderLayer: TransformerEncoderLayerSlowPath,
    nn.TransformerDecoderLayer: TransformerDecoderLayerSlowPath,
    nn.TransformerEncoder: TransformerEncoderSlowPath,
    nn.TransformerDecoder: TransformerDecoderSlowPath,
    nn.Transformer: TransformerSlowPath,
}


def copy_memo(model: nn.Module) -> dict[int, Any]:
    """``copy.deepcopy`` memo entries for tensors deepcopy refuses: the non-leaf ``weight`` that the
    old ``torch.nn.utils.weight_norm`` / ``spectral_norm`` hooks store on their module (recomputed
    from the real parameters by the hook at every forward, so a detached copy stands in)."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return memo


def _fold_reparametrizations(module: nn.Module, path: str, notes: list[str]) -> None:
    from torch.nn.utils import parametrize
    from torch.nn.utils.spectral_norm import SpectralNorm, remove_spectral_norm
    from torch.nn.utils.weight_norm import WeightNorm, remove_weight_norm

    for hook in list(module._forward_pre_hooks.values()):
        if isinstance(hook, WeightNorm):
            with torch.no_grad():
                remove_weight_norm(module, hook.name)
            notes.append(f"{path or 'model'}: torch.nn.utils.weight_norm folded into a plain {hook.name!r} "
                         "(re-apply weight normalisation after pruning if you fine-tune with it)")
        elif isinstance(hook, SpectralNorm):
            with torch.no_grad():
                remove_spectral_norm(module, hook.name)
            notes.append(f"{path or 'model'}: spectral_norm folded into a plain {hook.name!r}")
    if parametrize.is_parametrized(module):
        _fold_parametrizations(module, path, notes)


def _fold_parametrizations(module: nn.Module, path: str, notes: list[str]) -> None:
    """Replace every parametrized tensor of ``module`` by a plain one holding its current value.

    Not ``parametrize.remove_parametrizations``: that deletes the property from the module's
    parametrized class, which capture's copy shares with the user's model (deepcopy keeps classes),
    so it would break the user's model. Only this instance changes class here.
    """
    lists = module.parametrizations
    folded = {}
    with torch.no_grad():
        for name, plist in lists.items():
            originals = [t for t in (getattr(plist, "original", None), *(getattr(plist, f"original{i}", None)
                                                                          for i in range(len(plist._parameters))))
                         if isinstance(t, torch.Tensor)]
            trainable = any(isinstance(t, nn.Parameter) for t in originals)
            requires_grad = any(t.requires_grad for t in originals)
            folded[name] = (getattr(module, name).detach().clone(), trainable, requires_grad,
                            ", ".join(type(p).__name__ for p in plist))
    module.__class__ = type(module).__bases__[0]  # the class before parametrization (an instance change)
    del module._modules["parametrizations"]
    for name, (value, trainable, requires_grad, kinds) in folded.items():
        if trainable:
            module.register_parameter(name, nn.Parameter(value, requires_grad=requires_grad))
        else:
            module.register_buffer(name, value)
        notes.append(f"{path or 'model'}: parametrization of {name!r} ({kinds}) folded into a plain tensor "
                     "(re-apply it after pruning if you fine-tune with it)")


def prepare_model(model: nn.Module, notes: list[str]) -> nn.Module:
    """Fold re-parametrizations and swap stock transformer modules, in place on capture's private
    copy; returns the (possibly replaced) root."""
    for path, module in list(model.named_modules()):
        _fold_reparametrizations(module, path, notes)
    swapped = 0
    for _, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            cls = _SLOW_PATHS.get(type(child))
            if cls is not None:
                setattr(parent, name, cls(child))
                swapped += 1
    cls = _SLOW_PATHS.get(type(model))
    if cls is not None:
        model = cls(model)
        swapped += 1
    if swapped:
        notes.append(f"{swapped} stock nn.Transformer* module(s) captured through their documented slow path")
    return model
