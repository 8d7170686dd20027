"""Label-free quality of a pruned candidate: how close its outputs stay to the original's.

The ratio search scores each attempt with the user's ``evaluate(model)`` when there is one, and
otherwise with :func:`fidelity` on calibration data (higher is better, 1.0 = identical outputs):

* ``"kl"``: ``exp(-mean KL(softmax(o) || softmax(c)))`` with ``o``, ``c`` the original and
  candidate logits; the softmax runs over dim 1 (the class dim of ``[N, C]`` or ``[N, C, ...]``
  outputs) and the mean over samples (and positions). In (0, 1].
* ``"cosine"``: mean over samples of the cosine similarity of the outputs flattened per sample
  (embeddings, hidden states, feature maps). In [-1, 1]; two all-zero outputs count as 1.
* ``"token_kl"``: ``exp(-mean KL)`` per token over the *last* dim, for causal language models
  (``[batch, tokens, vocab]`` logits); tokens where the batch's ``attention_mask`` is 0 are left out.
* ``"auto"``: ``"token_kl"`` when the model returns 3-D ``logits`` (Hugging Face ``*ForCausalLM`` and
  their pruned graphs), ``"kl"`` for 2-D outputs with more than one column (class logits), else
  ``"cosine"``.

Models may return tuples, lists or dicts (Hugging Face ``ModelOutput``): the first tensor is
compared, or ``output[output_key]``. Both models run in eval mode under ``no_grad`` and get their
own training flags back afterwards. A candidate that produces NaN/Inf scores 0.0.

For a search that scores many candidates against one original, :class:`FidelityScorer` runs the
original once and caches its outputs.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxprune.errors import ConfigError, DataError, FxpruneError
from fxprune.importance import (
    Batch,
    collect_batches,
    forward,
    iter_batches,
    model_device,
    output_tensor,
    preserved_state,
)

__all__ = ["METRICS", "FidelityScorer", "fidelity", "accuracy"]

logger = logging.getLogger(__name__)

METRICS = ("auto", "kl", "cosine", "token_kl")


def _outputs(model: nn.Module, batches: list[Batch], output_key: str | None,
             lm: list[bool] | None = None) -> list[torch.Tensor]:
    """Outputs of ``model`` on every batch, in eval mode without gradients (mode restored).

    ``lm``: appended True when the model returns causal-LM token logits (3-D ``logits``)."""
    from fxprune.finetune import token_logits

    device = model_device(model)
    outs = []
    with preserved_state(model, train=False), torch.no_grad():
        for i, b in enumerate(batches):
            raw = forward(model, b.to(device), index=i)
            if lm is not None and output_key is None and token_logits(raw) is not None:
                lm.append(True)
            outs.append(output_tensor(raw, output_key))
    return outs


def _resolve_metric(metric: str, out: torch.Tensor, lm: bool = False) -> str:
    if metric not in METRICS:
        raise ConfigError(f"unknown fidelity metric {metric!r}; expected one of {METRICS}")
    if metric != "auto":
        return metric
    if lm:
        return "token_kl"
    return "kl" if out.dim() == 2 and out.shape[1] > 1 else "cosine"


def _token_kl_sum(ref: torch.Tensor, cand: torch.Tensor, mask: Any) -> tuple[float, int]:
    """Sum over non-padding tokens of KL(softmax(ref) || softmax(cand)) along the last dim, and the count."""
    log_p = F.log_softmax(ref.double(), dim=-1)
    log_q = F.log_softmax(cand.double(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
    if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(kl.shape):
        w = mask.to(kl.device, kl.dtype)
        return float((kl * w).sum()), int(w.sum())
    return float(kl.sum()), kl.numel()


def _kl_sum(ref: torch.Tensor, cand: torch.Tensor) -> tuple[float, int]:
    """Sum over samples (and positions) of KL(softmax(ref) || softmax(cand)) along dim 1, and the count."""
    if ref.dim() < 2:
        raise DataError(
            f"metric 'kl' needs outputs with a class dim (at least 2-D), got shape {list(ref.shape)}"
        )
    log_p = F.log_softmax(ref.double(), dim=1)
    log_q = F.log_softmax(cand.double(), dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    return float(kl.sum()), kl.numel()


def _cosine_sum(ref: torch.Tensor, cand: torch.Tensor) -> tuple[float, int]:
    """Sum over samples of the cosine similarity of per-sample flattened outputs, and the count."""
    a = ref.double().reshape(ref.shape[0] if ref.dim() else 1, -1)
    b = cand.double().reshape(a.shape[0], -1)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    cos = (a * b).sum(dim=1) / (na * nb).clamp_min(1e-300)
    both_zero = (na == 0) & (nb == 0)
    cos = torch.where(both_zero, torch.ones_like(cos), cos)
    return float(cos.sum()), cos.numel()


class FidelityScorer:
    """Scores candidates against one original model, whose outputs are computed once.

    Args:
        original: the reference model (not modified).
        data: calibration data (tensor, ``(x, y)``, list of batches or DataLoader; labels unused).
        metric: ``"auto"``, ``"kl"`` or ``"cosine"`` (module doc).
        max_batches: batches used.
        output_key: key of the output to compare when the model returns a dict.

    Raises:
        DataError: empty data, or data the original model cannot run on.
    """

    def __init__(
        self,
        original: nn.Module,
        data: Any,
        *,
        metric: str = "auto",
        max_batches: int = 4,
        output_key: str | None = None,
    ):
        self.batches = collect_batches(data, max_batches)
        self.output_key = output_key
        lm: list[bool] = []
        self.reference = _outputs(original, self.batches, output_key, lm)
        self.metric = _resolve_metric(metric, self.reference[0], bool(lm))

    def __call__(self, candidate: nn.Module) -> float:
        """Fidelity of ``candidate`` (higher is better, 1.0 = identical outputs)."""
        outs = _outputs(candidate, self.batches, self.output_key)
        total, count = 0.0, 0
        for i, (ref, out) in enumerate(zip(self.reference, outs)):
            if out.shape != ref.shape:
                raise FxpruneError(
                    f"candidate output on batch {i} has shape {list(out.shape)}, the original's has "
                    f"{list(ref.shape)}: pruning must not change the output shape"
                )
            out = out.to(ref.device)
            if self.metric == "token_kl":
                s, n = _token_kl_sum(ref, out, self.batches[i].kwargs.get("attention_mask"))
            else:
                s, n = _kl_sum(ref, out) if self.metric == "kl" else _cosine_sum(ref, out)
            total, count = total + s, count + n
        mean = total / max(count, 1)
        score = math.exp(-max(mean, 0.0)) if self.metric in ("kl", "token_kl") else min(mean, 1.0)
        if not math.isfinite(score):
            logger.warning("candidate produced non-finite outputs (%s = %s): fidelity 0.0", self.metric, mean)
            return 0.0
        return score


def fidelity(
    original: nn.Module,
    candidate: nn.Module,
    data: Any,
    *,
    metric: str = "auto",
    max_batches: int = 4,
    output_key: str | None = None,
) -> float:
    """How closely ``candidate`` reproduces ``original`` on ``data`` (1.0 = identical outputs).

    Args:
        original: the reference model.
        candidate: the model to score (e.g. a pruned copy).
        data: calibration data; labels, if any, are ignored.
        metric: ``"auto"``, ``"kl"`` or ``"cosine"`` (module doc).
        max_batches: batches used.
        output_key: key of the output to compare when the models return dicts.

    Returns:
        The fidelity, higher is better.

    Raises:
        DataError: empty data or data that does not fit the models.
        FxpruneError: the candidate's output shape differs from the original's.

    Example:
        >>> m = nn.Linear(4, 3)
        >>> fidelity(m, m, torch.randn(8, 4))
        1.0
    """
    scorer = FidelityScorer(original, data, metric=metric, max_batches=max_batches, output_key=output_key)
    return scorer(candidate)


def accuracy(
    model: nn.Module, data: Any, *, max_batches: int | None = None, output_key: str | None = None
) -> float:
    """Top-1 accuracy of ``model`` on labelled data (argmax over dim 1 of its output).

    Args:
        model: the classifier (mode restored afterwards).
        data: labelled data: ``(x, y)``, a list of such batches, or a DataLoader.
        max_batches: stop after this many batches (all when None).
        output_key: key of the logits when the model returns a dict.

    Returns:
        The fraction of correct predictions.

    Raises:
        DataError: empty data, a batch without labels, or data that does not fit the model.
    """
    device = model_device(model)
    correct = total = 0
    with preserved_state(model, train=False), torch.no_grad():
        for i, batch in enumerate(iter_batches(data)):
            if max_batches is not None and i >= max_batches:
                break
            if batch.target is None:
                raise DataError(f"accuracy needs labelled batches (x, y); batch {i} has inputs only")
            out = output_tensor(forward(model, batch.to(device), index=i), output_key)
            target = batch.target.to(out.device)
            if target.dim() == out.dim() and target.is_floating_point():  # one-hot / soft labels
                target = target.argmax(dim=1)
            expected = out.shape[:1] + out.shape[2:]
            if out.dim() < 2 or target.shape != expected:
                raise DataError(
                    f"batch {i}: expected labels of shape {list(expected)} for an output of shape "
                    f"{list(out.shape)}, got {list(batch.target.shape)}"
                )
            correct += int((out.argmax(dim=1) == target).sum())
            total += target.numel()
    if total == 0:
        raise DataError(f"expected at least one labelled batch, got an empty {type(data).__name__}")
    return correct / total
