"""Per-unit importance of dependency groups: magnitude, BN scale, Taylor and zero-cost proxies.

A dependency group (:class:`UnitGroup`) has ``n_units`` prunable units (channels or whole
attention heads). Removing a unit removes hyperplanes from several tensors at once; each
:class:`ParamSlice` names one tensor, the dim it is sliced along and, per unit, the ``k`` indices
along that dim the unit owns (``k > 1`` when a flatten gives each channel a spatial block, or a
head owns ``head_dim`` rows). :func:`group_importance` turns that description into one score per
unit (float64, higher = keep).

Criteria (``w`` a parameter, ``g = ∂L/∂w`` averaged over the calibration batches, ``H`` the Hessian
of the same loss, ``P(u)`` the elements of every parameter slice that unit ``u`` owns):

* ``l1`` / ``l2``: ``s_t(u) = Σ_{P_t(u)} |w|`` (resp. ``w²``, the *squared* L2 norm) per
  producer/consumer slice ``t``. Each slice's vector is divided by its mean over the units (slices
  with a zero mean are skipped) and the normalised vectors are averaged. Normalising gives every
  tensor one equal vote: a 3x3 conv filter has hundreds of elements per unit and a following
  linear column a handful, so raw sums would let the largest tensor decide alone. Biases, norm
  affines and buffers are left out (``bn_scale`` is the norm criterion).
* ``bn_scale``: ``|γ|`` of the group's ``"norm"`` slices (normalised and averaged like above).
  Groups without a norm slice fall back to ``l1``; :attr:`ImportanceScores.notes` says which.
* ``taylor`` (Molchanov et al. 2019): ``mean_b (Σ_{P_c(u)} w·g_b)²`` over micro-batches ``b`` of
  at most 16 examples, where ``P_c(u)`` are the unit's *consumer* slices: the first-order loss
  change of removing the unit from the layers that read it, squared per micro-batch. (The mean
  gradient ``ḡ`` vanishes at a trained minimum, which made ``|Σ w·ḡ|`` select channels worse than
  random on a trained CNN; per-batch squares do not vanish.)
* ``snip`` (Lee et al. 2019): ``Σ_{P(u)} |w·g|``.
* ``grasp`` (Wang et al. 2020): the paper scores a weight by ``S = -w ⊙ Hg``, the first-order change
  of the gradient norm when the weight is removed, and prunes the *largest* scores. To keep
  "higher = keep" we return the negation ``w ⊙ Hg`` (element-wise, from :func:`weight_saliency`)
  and its signed sum over the unit. Scores may be negative. ``Hg`` comes from double backprop,
  run with PyTorch's math attention kernel (the fused ones have no double backward).
* ``synflow`` (Tanaka et al. 2020): data-free. On a float64 deep copy in eval mode with every
  parameter replaced by ``|w|``, ``R = Σ f(1)`` for an all-ones input shaped like one example and
  the saliency is ``|w| · ∂R/∂|w|``, summed over the unit. Only the input *shape* is read from data.
  SynFlow assumes a positively homogeneous network; after a LayerNorm an all-ones input
  normalises to zero, so on transformers its scores carry little signal.
* ``random``: uniform noise from ``numpy.random.default_rng([seed, group.id])``.
* ``uniform``: every unit scores 1 (structure only: reads no weight and no data). Policies then
  allocate by MAC cost alone and the first units of each group are kept. It is what
  ``compile(..., plan_only=True)`` uses for a model whose weights are on the meta device.
* ``activation`` / ``activation_l2`` (Minitron, Muralidharan et al. 2024): the size of what the unit
  feeds into the layers that read it, on calibration data. For every *consumer* slice (a linear's
  input columns, a dense conv's input channels, a Conv1D's input rows) the input activations ``x``
  of that layer are aggregated per channel over every calibration token: ``activation`` is
  ``Σ_{c ∈ u} mean_t |x_c|``, ``activation_l2`` is ``sqrt(Σ_{c ∈ u} mean_t x_c²)`` (the RMS norm of the
  unit's activations). For an MLP neuron that is its activation (the input of ``down_proj``), for a
  head its attention output (the input of ``o_proj``), for an embedding channel the normalised
  hidden state every layer reads (the inputs of q/k/v/gate/up and the LM head). Tokens where the
  batch's ``attention_mask`` is 0 (padding) are left out. Consumers are normalised and averaged
  like the magnitude criteria; groups without a consumer whose input can be observed fall back to
  ``l2`` (with a note).

Saliency criteria are all in the same unit (a change of ``L`` or ``R``), so they are *summed* over
the unit's slices without normalisation; buffers carry no gradient and are skipped.

Calibration data (``data``) may be a tensor of inputs, a tuple ``(x, y)``, a list of batches, a
dict batch or any iterable such as a ``DataLoader`` yielding tensors, ``(x, y[, ...])`` tuples or
dicts (label keys ``labels``/``label``/``targets``/``target``/``y``; the rest are passed as keyword
arguments, or positionally when the only key is ``x``/``input``/``inputs``/``image``/``images``).
A *list* of exactly two tensors is read as ``(x, y)`` when the second looks like labels (integer
dtype, or fewer dims than the first), else as two input batches; a tuple is always ``(x, y)``.
A model with several positional inputs takes batches ``((x1, x2), y)`` or dicts.

Losses: with labels and no ``loss_fn``, cross-entropy. Without labels and no ``loss_fn``, a
label-free loss: the cross-entropy of the output, read as logits, against its own detached argmax
(pseudo-labels). Its gradient with respect to the logits, ``softmax(z) - onehot(argmax z)``,
vanishes only for a one-hot prediction; KL to the model's own detached softmax would be zero
together with its gradient, so every first-order score would vanish. The logit dim is dim 1 for
2-D outputs (classes) and 4-D+ outputs (channels) and the last dim for 3-D outputs (Hugging Face
``[batch, tokens, features]`` hidden states). Output energy ``0.5·mean(f²)`` is *not* used for
embeddings: after a final LayerNorm it is nearly constant, so its gradient is close to zero (and
it measures the radial direction a cosine comparison ignores); it remains the fallback for
outputs with a single logit. A custom ``loss_fn`` is called as ``loss_fn(output, y)``, or
``loss_fn(output)`` when the batch has no labels. Models that return tuples, lists or dicts
(Hugging Face ``ModelOutput``) are scored on their first tensor (depth first), e.g. ``logits``
or ``last_hidden_state``.

The caller's model is never changed: gradients are taken in eval mode (BatchNorm uses its running
statistics, dropout is off, scores are deterministic) with ``torch.autograd.grad`` (``.grad`` is
untouched); training flags, ``requires_grad`` and every buffer are restored afterwards, and
SynFlow works on a deep copy.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fxprune import progress
from fxprune.errors import ConfigError, DataError, FxpruneError

__all__ = [
    "CRITERIA",
    "ParamSlice",
    "UnitGroup",
    "ImportanceScores",
    "group_importance",
    "weight_saliency",
    "group_features",
]

logger = logging.getLogger(__name__)

CRITERIA = ("l1", "l2", "bn_scale", "taylor", "snip", "grasp", "synflow", "random", "activation", "activation_l2",
            "uniform")
SALIENCY_CRITERIA = ("taylor", "snip", "grasp", "synflow")
ACTIVATION_CRITERIA = ("activation", "activation_l2")
DATA_CRITERIA = ("taylor", "snip", "grasp", "activation", "activation_l2")
ROLES = ("producer", "consumer", "norm", "other")

LossFn = Callable[..., torch.Tensor]


# --------------------------------------------------------------------------------------------
# Group description
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ParamSlice:
    """The hyperplanes of one tensor that each unit of a group owns.

    Attributes:
        param: qualified name in ``model.named_parameters()`` or ``model.named_buffers()``.
        dim: the tensor dim being sliced.
        index: int64 array ``[n_units, k]``; row ``u`` holds the indices along ``dim`` that
            belong to unit ``u``. A 1-D array is read as ``k = 1``. Stored read-only.
        role: ``"producer"`` (output side of conv/linear/embedding), ``"consumer"`` (input side),
            ``"norm"`` (BatchNorm/LayerNorm/GroupNorm affine weight) or ``"other"`` (bias,
            buffers, anything else).
    """

    param: str
    dim: int
    index: np.ndarray
    role: str = "other"

    def __post_init__(self) -> None:
        index = np.array(self.index, dtype=np.int64)
        if index.ndim == 1:
            index = index[:, None]
        if index.ndim != 2:
            raise ValueError(
                f"ParamSlice({self.param!r}): index must be [n_units, k], got shape {index.shape}"
            )
        if self.role not in ROLES:
            raise ValueError(f"ParamSlice({self.param!r}): role must be one of {ROLES}, got {self.role!r}")
        index.flags.writeable = False
        object.__setattr__(self, "index", index)

    @property
    def n_units(self) -> int:
        return int(self.index.shape[0])


@dataclass(frozen=True)
class UnitGroup:
    """A dependency group: ``n_units`` units, each removing hyperplanes from every slice.

    Attributes:
        id: group id (the key of the returned score dicts).
        n_units: number of prunable units.
        slices: the tensors the group slices.
    """

    id: int
    n_units: int
    slices: tuple[ParamSlice, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "slices", tuple(self.slices))
        for s in self.slices:
            if s.n_units != self.n_units:
                raise ValueError(
                    f"group {self.id}: slice of {s.param!r} has {s.n_units} index rows, "
                    f"expected n_units={self.n_units}"
                )


class ImportanceScores(dict):
    """``{group id: float64 [n_units]}`` with the criterion used and per-group notes.

    Attributes:
        criterion: the criterion that produced the scores.
        notes: ``{group id: text}`` for groups scored differently than asked (e.g. ``bn_scale``
            falling back to ``l1``).
    """

    def __init__(
        self, scores: Mapping[int, np.ndarray], criterion: str, notes: Mapping[int, str] | None = None
    ):
        super().__init__(scores)
        self.criterion = criterion
        self.notes: dict[int, str] = dict(notes or {})


@dataclass(frozen=True)
class _Tensor:
    tensor: torch.Tensor
    is_param: bool
    canonical: str  # name under which weight_saliency reports it


def _tensor_table(model: nn.Module) -> dict[str, _Tensor]:
    """Every parameter (aliases of tied weights included) and buffer by qualified name."""
    canonical_by_id = {id(p): n for n, p in model.named_parameters()}
    table = {
        n: _Tensor(p, True, canonical_by_id[id(p)]) for n, p in model.named_parameters(remove_duplicate=False)
    }
    for n, b in model.named_buffers(remove_duplicate=False):
        table.setdefault(n, _Tensor(b, False, n))
    return table


def _check_groups(groups: Sequence[UnitGroup], table: Mapping[str, _Tensor]) -> None:
    for g in groups:
        for s in g.slices:
            if s.param not in table:
                raise ValueError(
                    f"group {g.id}: slice names {s.param!r}, which is neither a parameter nor a buffer "
                    "of the model"
                )
            t = table[s.param].tensor
            if not -t.dim() <= s.dim < max(t.dim(), 1):
                raise ValueError(
                    f"group {g.id}: {s.param!r} has shape {tuple(t.shape)}, cannot slice dim {s.dim}"
                )
            size = t.shape[s.dim] if t.dim() else 1
            if s.index.size and (s.index.min() < 0 or s.index.max() >= size):
                raise ValueError(
                    f"group {g.id}: index of {s.param!r} out of range for dim {s.dim} of size {size} "
                    f"(min {s.index.min()}, max {s.index.max()})"
                )


# --------------------------------------------------------------------------------------------
# Data: batches, forward, losses (shared with fxprune.quality and fxprune.finetune)
# --------------------------------------------------------------------------------------------

_LABEL_KEYS = ("labels", "label", "targets", "target", "y")
_POSITIONAL_KEYS = ("x", "input", "inputs", "image", "images")


@dataclass
class Batch:
    """One normalised batch: positional inputs, keyword inputs and optional labels."""

    args: tuple
    kwargs: dict = field(default_factory=dict)
    target: torch.Tensor | None = None

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (*self.args, *self.kwargs.values()) if isinstance(t, torch.Tensor)]

    @property
    def size(self) -> int:
        ts = self.tensors
        return int(ts[0].shape[0]) if ts and ts[0].dim() else 1

    def to(self, device: torch.device | None) -> Batch:
        if device is None:
            return self
        mv = lambda t: t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t  # noqa: E731
        target = mv(self.target) if self.target is not None else None
        return Batch(tuple(mv(a) for a in self.args), {k: mv(v) for k, v in self.kwargs.items()}, target)

    def describe(self) -> str:
        parts = [_describe(a) for a in self.args] + [f"{k}={_describe(v)}" for k, v in self.kwargs.items()]
        return ", ".join(parts) or "(no inputs)"

    def ones_like_example(self, rows: int | None = 1) -> Batch:
        """An all-ones batch of ``rows`` examples (all when None); float inputs become float64."""

        def one(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            ex = t[:rows] if t.dim() else t
            dtype = torch.float64 if ex.is_floating_point() else ex.dtype
            return torch.ones(ex.shape, dtype=dtype, device=ex.device)

        return Batch(tuple(one(a) for a in self.args), {k: one(v) for k, v in self.kwargs.items()})


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor of shape {list(t.shape)} and dtype {t.dtype}"
    return type(t).__name__


def _as_tensor(v: Any, what: str) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    try:
        return torch.as_tensor(np.asarray(v))
    except Exception as err:
        raise DataError(f"{what}: expected a tensor (or array-like), got {type(v).__name__}") from err


def to_batch(item: Any, position: int = 0) -> Batch:
    """Normalise one batch item: a tensor, an ``(x, y[, ...])`` sequence or a dict (module doc).

    Raises:
        DataError: an item that is not a batch, an empty batch, or labels of the wrong length.
    """
    where = f"batch {position}"
    if isinstance(item, (torch.Tensor, np.ndarray)):
        batch = Batch((_as_tensor(item, where),))
    elif isinstance(item, Mapping):
        items = dict(item)
        label_key = next((k for k in _LABEL_KEYS if k in items), None)
        target = items.pop(label_key) if label_key is not None else None
        if not items:
            raise DataError(f"{where}: dict batch has no inputs besides its labels (keys {list(item)})")
        if len(items) == 1 and next(iter(items)) in _POSITIONAL_KEYS:
            batch = Batch((next(iter(items.values())),))
        else:
            batch = Batch((), items)
        batch.target = None if target is None else _as_tensor(target, f"{where}: labels")
    elif isinstance(item, (tuple, list)):
        if not item:
            raise DataError(
                f"{where}: expected a tensor, (x, y) or a dict, got an empty {type(item).__name__}"
            )
        x = item[0]
        if isinstance(x, Mapping):
            batch = Batch((), dict(x))
        elif isinstance(x, (tuple, list)):
            batch = Batch(tuple(x))
        else:
            batch = Batch((_as_tensor(x, f"{where}: inputs"),))
        if len(item) > 1 and item[1] is not None:
            batch.target = _as_tensor(item[1], f"{where}: labels")
    else:
        raise DataError(
            f"{where}: expected a tensor, an (x, y) tuple or a dict batch, got {type(item).__name__}"
        )
    _check_batch(batch, where)
    return batch


def _check_batch(batch: Batch, where: str) -> None:
    if not batch.tensors:
        raise DataError(f"{where}: expected at least one input tensor, got {batch.describe()}")
    n = batch.size
    if n == 0:
        raise DataError(f"{where}: expected a non-empty batch, got {batch.describe()}")
    y = batch.target
    if y is not None and (y.dim() == 0 or y.shape[0] != n):
        got = "a scalar" if y.dim() == 0 else f"{y.shape[0]} (labels of shape {list(y.shape)})"
        raise DataError(
            f"{where}: expected {n} labels, one per example of the input batch ({batch.describe()}), "
            f"got {got}"
        )


def is_xy_pair(seq: Sequence) -> bool:
    """Whether a top-level 2-sequence of data is one ``(x, y)`` batch rather than two batches.

    A tuple ``(tensor, labels)`` always is. A list ``[a, b]`` of tensors is when ``b`` looks like
    labels: integer/bool dtype, or fewer dims than ``a`` (one-hot or soft labels).
    """
    if len(seq) != 2 or not isinstance(seq[0], torch.Tensor):
        return False
    x, y = seq
    if isinstance(seq, tuple):
        return y is None or isinstance(y, (torch.Tensor, np.ndarray, list))
    if not isinstance(y, torch.Tensor):
        return False
    return not (y.is_floating_point() or y.is_complex()) or y.dim() < x.dim()


def iter_batches(data: Any) -> Iterator[Batch]:
    """Yield normalised :class:`Batch` objects from any supported data form (lazily).

    Raises:
        DataError: for ``None``, strings and items that are not batches.
    """
    if data is None:
        raise DataError(
            "expected calibration data (a tensor, (x, y), a list of batches or a DataLoader), got None"
        )
    if isinstance(data, (str, bytes)):
        raise DataError(f"expected tensors or a DataLoader, got {type(data).__name__} {data!r:.40}")
    if isinstance(data, (torch.Tensor, np.ndarray, Mapping)):
        yield to_batch(data, 0)
        return
    if isinstance(data, (tuple, list)) and is_xy_pair(data):
        yield to_batch(tuple(data), 0)
        return
    if not isinstance(data, Iterable):
        raise DataError(
            f"expected a tensor, (x, y), a list of batches or a DataLoader, got {type(data).__name__}"
        )
    for i, item in enumerate(data):
        yield to_batch(item, i)


def collect_batches(data: Any, max_batches: int | None = None) -> list[Batch]:
    """Materialise up to ``max_batches`` batches; an empty source is a :class:`DataError`."""
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    batches = list(itertools.islice(iter_batches(data), max_batches))
    if not batches:
        raise DataError(f"expected at least one batch, got an empty {type(data).__name__}")
    return batches


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a stateless model)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def output_tensor(out: Any, key: str | None = None) -> torch.Tensor:
    """The tensor a model output is scored on: ``out[key]`` if given, else the first tensor."""
    if key is not None:
        if isinstance(out, Mapping) and key in out:
            return output_tensor(out[key])
        if hasattr(out, key):
            return output_tensor(getattr(out, key))
        raise DataError(f"model output has no entry {key!r} (got {type(out).__name__})")
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    for v in values:
        try:
            return output_tensor(v)
        except DataError:
            continue
    raise DataError(
        f"expected the model to return a tensor, or a tuple/dict holding one; got {type(out).__name__}"
    )


def _expected_input(model: nn.Module) -> str:
    """What the first conv/linear/embedding of the model accepts, in words."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            spatial = {1: "L", 2: "H, W", 3: "D, H, W"}[m.weight.dim() - 2]
            return (
                f"{type(m).__name__} '{name}' takes floating-point input ({m.weight.dtype}) of shape "
                f"[N, {m.in_channels}, {spatial}]"
            )
        if isinstance(m, nn.Linear):
            return (
                f"Linear '{name}' takes floating-point input ({m.weight.dtype}) of shape "
                f"[..., {m.in_features}]"
            )
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
            return f"{type(m).__name__} '{name}' takes integer token ids in [0, {m.num_embeddings})"
    return "inputs matching the model's forward signature"


def forward(model: nn.Module, batch: Batch, *, index: int = 0) -> Any:
    """Run ``model`` on one batch; a failure becomes a :class:`DataError` saying what was expected.

    Args:
        model: the model.
        batch: the batch, already on the model's device.
        index: batch position, for the message.
    """
    try:
        return model(*batch.args, **batch.kwargs)
    except (RuntimeError, TypeError, ValueError, IndexError, AssertionError) as err:
        raise DataError(
            f"the model's forward failed on batch {index}. Expected: {_expected_input(model)}. "
            f"Given: {batch.describe()}. torch said: {_first_line(err)}"
        ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def is_logits(out: torch.Tensor) -> bool:
    """2-D floating output with more than one column: treated as class logits."""
    return out.dim() == 2 and out.shape[1] > 1 and out.is_floating_point()


def label_free_loss(out: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the output, read as logits, against its own argmax (see the module doc).

    The logit dim is dim 1 for 2-D and 4-D+ outputs (classes, channels) and the last dim for 3-D
    outputs (``[batch, tokens, features]``). Outputs with a single logit fall back to
    ``0.5·mean(out²)``.
    """
    if out.dim() >= 2:
        dim = 2 if out.dim() == 3 else 1
        if out.shape[dim] > 1:
            logits = out.movedim(dim, -1).reshape(-1, out.shape[dim]).float()
            return F.cross_entropy(logits, logits.detach().argmax(dim=1))
    return 0.5 * out.float().pow(2).mean()


def compute_loss(
    out: torch.Tensor, target: torch.Tensor | None, loss_fn: LossFn | None, *, index: int = 0
) -> torch.Tensor:
    """The calibration loss of one batch (see the module doc); label problems become DataError."""
    try:
        if loss_fn is not None:
            loss = loss_fn(out, target) if target is not None else loss_fn(out)
        elif target is not None:
            loss = F.cross_entropy(out, target)
        else:
            loss = label_free_loss(out)
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        classes = f" with labels in [0, {out.shape[1]})" if out.dim() >= 2 else ""
        given = "no labels" if target is None else f"labels {_describe(target)}"
        raise DataError(
            f"the loss failed on batch {index}: expected labels that fit a model output of shape "
            f"{list(out.shape)}{classes}; got {given}. torch said: {_first_line(err)}"
        ) from err
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise DataError(f"loss_fn must return a scalar tensor, got {_describe(loss)}")
    return loss


@contextlib.contextmanager
def preserved_state(
    model: nn.Module,
    *,
    train: bool | None = False,
    requires_grad: bool | None = None,
    restore_buffers: bool = True,
) -> Iterator[nn.Module]:
    """Temporarily set the mode / ``requires_grad`` of ``model``; restore both, and buffers, after.

    Args:
        model: the model.
        train: mode inside the block (``None`` leaves it).
        requires_grad: ``requires_grad`` of every parameter inside the block (``None`` leaves it).
        restore_buffers: copy every buffer back afterwards (guards BatchNorm statistics even for
            graphs whose batch-norm ignores ``eval()``).
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    saved = [(b, b.detach().clone()) for b in model.buffers()] if restore_buffers else []
    try:
        if train is not None:
            _set_mode(model, train)
        if requires_grad is not None:
            for p, _ in flags:
                p.requires_grad_(requires_grad)
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)
        with torch.no_grad():
            for b, value in saved:
                if b.shape == value.shape:
                    b.copy_(value)


def _set_mode(model: nn.Module, train: bool) -> None:
    """``model.train(train)``; modules that refuse (``torch.export`` graphs fix their mode) keep theirs."""
    try:
        model.train(train)
    except NotImplementedError:
        logger.debug("%s does not support train()/eval(); its graph fixes the mode", type(model).__name__)


def _validate(
    model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn | None, device: torch.device
) -> None:
    """One no-grad forward and loss on the first batch: bad data fails here, before any work."""
    with torch.no_grad():
        batch = batches[0].to(device)
        out = output_tensor(forward(model, batch))
        compute_loss(out, batch.target, loss_fn)


# --------------------------------------------------------------------------------------------
# Element-wise saliency
# --------------------------------------------------------------------------------------------


def weight_saliency(
    model: nn.Module,
    criterion: str,
    *,
    data: Any = None,
    loss_fn: LossFn | None = None,
    max_batches: int = 8,
) -> dict[str, torch.Tensor]:
    """Element-wise saliency of every parameter (float64, CPU, same shapes as the parameters).

    Args:
        model: any ``nn.Module`` (not modified).
        criterion: ``"taylor"`` (signed ``w·g``), ``"snip"`` (``|w·g|``), ``"grasp"`` (``w ⊙ Hg``,
            the negated GraSP score so that higher = keep) or ``"synflow"`` (``|w|·∂R/∂|w|``).
        data: calibration data (see the module doc); SynFlow reads only the shape of one example.
        loss_fn: optional ``loss_fn(output, y)`` / ``loss_fn(output)``.
        max_batches: number of batches the gradient is averaged over.

    Returns:
        ``{parameter name: saliency}`` for every entry of ``model.named_parameters()``.

    Raises:
        DataError: missing, empty or ill-fitting data.
    """
    criterion = _check_criterion(criterion, SALIENCY_CRITERIA)
    return _saliencies(model, (criterion,), data, loss_fn, max_batches)[criterion]


def _saliencies(
    model: nn.Module, criteria: Sequence[str], data: Any, loss_fn: LossFn | None, max_batches: int
) -> dict[str, dict[str, torch.Tensor]]:
    """Several saliencies at once, sharing the gradient pass between taylor, snip and grasp."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    if "synflow" in criteria:
        out["synflow"] = _synflow(model, data)
    wanted = [c for c in criteria if c in DATA_CRITERIA]
    if not wanted:
        return out
    if data is None:
        raise DataError(f"criterion {wanted[0]!r} needs calibration data (data=...), got None")
    batches = collect_batches(data, max_batches)
    device = model_device(model)
    named = list(model.named_parameters())
    params = [p for _, p in named]
    with preserved_state(model, train=False, requires_grad=True), torch.enable_grad():
        _validate(model, batches, loss_fn, device)
        grads = _mean_gradients(model, params, batches, loss_fn, device)
        if "grasp" in wanted:
            # fused attention kernels have no double backward; the math kernel does
            with sdpa_kernel([SDPBackend.MATH]):
                hg = _hessian_gradient(model, params, grads, batches, loss_fn, device)
    for c in wanted:
        if c == "taylor":
            sal = [p.detach() * g for p, g in zip(params, grads)]
        elif c == "snip":
            sal = [(p.detach() * g).abs() for p, g in zip(params, grads)]
        else:
            sal = [p.detach() * h for p, h in zip(params, hg)]
        out[c] = {n: s.to("cpu", torch.float64) for (n, _), s in zip(named, sal)}
    return out


def _batch_loss(model: nn.Module, batch: Batch, loss_fn: LossFn | None, index: int) -> torch.Tensor:
    out = output_tensor(forward(model, batch, index=index))
    return compute_loss(out, batch.target, loss_fn, index=index)


def _mean_gradients(
    model: nn.Module,
    params: list[torch.Tensor],
    batches: Sequence[Batch],
    loss_fn: LossFn | None,
    device: torch.device,
) -> list[torch.Tensor]:
    """``∂L/∂w`` with ``L`` the mean of the per-batch losses (unused parameters get zeros)."""
    acc = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for i, batch in enumerate(progress.bar(batches, desc="importance (gradients)", unit="batch")):
        loss = _batch_loss(model, batch.to(device), loss_fn, i)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for a, g in zip(acc, grads):
            if g is not None:
                a += g.detach().double()
    return [(a / len(batches)).to(p.dtype) for a, p in zip(acc, params)]


def _hessian_gradient(
    model: nn.Module,
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    batches: Sequence[Batch],
    loss_fn: LossFn | None,
    device: torch.device,
) -> list[torch.Tensor]:
    """``H g`` by double backprop: ``∂/∂w (∂L/∂w · stop_grad(g))``, averaged over the batches."""
    acc = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    for i, batch in enumerate(batches):
        loss = _batch_loss(model, batch.to(device), loss_fn, i)
        g = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        terms = [(gi * gbar).sum() for gi, gbar in zip(g, grads) if gi is not None and gi.requires_grad]
        if not terms:  # the loss is linear in every parameter: H = 0
            continue
        try:
            hg = torch.autograd.grad(torch.stack(terms).sum(), params, allow_unused=True)
        except RuntimeError as err:
            raise FxpruneError(
                "GraSP needs a double backward, which an op of this model does not support: "
                f"{_first_line(err)}. Use 'snip' or 'taylor' instead."
            ) from err
        for a, h in zip(acc, hg):
            if h is not None:
                a += h.detach().double()
    return [(a / len(batches)).to(p.dtype) for a, p in zip(acc, params)]


def _synflow_objective(net: nn.Module, example: Batch) -> torch.Tensor:
    """``R = Σ f(1)`` for one all-ones example.

    Graphs captured with a static batch size reject a batch of one; they get the all-ones input at
    the example batch's size and ``R / N``, the same value since eval-mode samples are independent.
    """
    device = model_device(net)
    try:
        return output_tensor(forward(net, example.ones_like_example(1).to(device))).double().sum()
    except DataError:
        if example.size == 1:
            raise
        logger.debug("synflow: batch of one rejected, using the example batch's size %d", example.size)
    full = example.ones_like_example(None).to(device)
    return output_tensor(forward(net, full)).double().sum() / example.size


def _synflow(model: nn.Module, data: Any) -> dict[str, torch.Tensor]:
    """SynFlow saliency on a float64 deep copy with ``|w|`` weights and an all-ones input."""
    if data is None:
        raise DataError(
            "criterion 'synflow' is data-free but needs the shape of one input example: pass data=<a batch>"
        )
    example = next(iter_batches(data), None)
    if example is None:
        raise DataError(
            f"expected at least one batch to read the input shape from, got an empty {type(data).__name__}"
        )
    net = copy.deepcopy(model).double()
    _set_mode(net, False)
    named = list(net.named_parameters())
    with torch.no_grad():
        for _, p in named:
            p.abs_()
            p.requires_grad_(True)
    with torch.enable_grad():
        r = _synflow_objective(net, example)
        grads = torch.autograd.grad(r, [p for _, p in named], allow_unused=True)
    return {
        n: (p.detach() * g if g is not None else torch.zeros_like(p)).to("cpu", torch.float64)
        for (n, p), g in zip(named, grads)
    }


# --------------------------------------------------------------------------------------------
# Per-unit aggregation
# --------------------------------------------------------------------------------------------


def _check_criterion(criterion: str, allowed: Sequence[str]) -> str:
    if criterion not in allowed:
        raise ConfigError(f"unknown criterion {criterion!r}; expected one of {tuple(allowed)}")
    return criterion


#: Elements reduced at a time: bounds the temporaries of a reduction to a few MB (cache-sized) whatever
#: the tensor's size (a 128k x 4096 embedding is read in slabs, never copied whole).
_CHUNK = 1 << 20


def _index_sums(values: torch.Tensor, dims: Iterable[int], power: int = 0) -> dict[int, np.ndarray]:
    """For each dim in ``dims``: the sum of ``values`` (``|values|**power`` when ``power`` is 1 or
    2) over every other dim, as a float64 numpy vector along that dim.

    One pass over the tensor serves every dim: it is read in slabs of rows (dim 0) of at most
    ``_CHUNK`` elements, each slab is reduced along all requested dims in float32 (float64 for
    float64 tensors; half-precision slabs are widened first) and the slab results are accumulated
    in float64. The tensor is never copied whole, and each element is read once.
    """
    v = values.detach()
    if v.dim() == 0:
        v = v.reshape(1)
    want = sorted({d % v.dim() for d in dims})
    out = {d: torch.zeros(v.shape[d], dtype=torch.float64, device=v.device) for d in want}
    rows = v.shape[0]
    per_row = max(1, v[0].numel()) if rows else 1
    step = max(1, _CHUNK // per_row)
    with torch.no_grad():
        for i in range(0, rows, step):
            c = v[i:i + step]
            if c.dtype != torch.float64:
                c = c.to(torch.float32)
            if power == 1:
                c = c.abs()
            elif power == 2:
                c = c * c
            for d in want:
                other = [x for x in range(c.dim()) if x != d]
                red = c.sum(dim=other) if other else c
                if d == 0:
                    out[0][i:i + step] += red
                else:
                    out[d] += red
    return {d: t.cpu().numpy() for d, t in out.items()}


def _per_index(values: torch.Tensor, dim: int) -> np.ndarray:
    """Sum ``values`` over every dim but ``dim`` (float64 numpy vector along ``dim``)."""
    v = values if values.dim() else values.reshape(1)
    return _index_sums(v, (dim,))[dim % v.dim()]


def _per_unit(values: torch.Tensor, s: ParamSlice) -> np.ndarray:
    """Sum ``values`` over every dim but ``s.dim``, gather each unit's ``k`` indices and sum them."""
    return _per_index(values, s.dim)[s.index].sum(axis=1)


def _normalised_mean(vectors: Iterable[np.ndarray]) -> np.ndarray | None:
    """Average of the vectors, each divided by its mean; zero-mean vectors are skipped."""
    acc, count = None, 0
    for v in vectors:
        m = float(v.mean()) if v.size else 0.0
        if not np.isfinite(m) or m <= 0.0:
            continue
        acc = v / m if acc is None else acc + v / m
        count += 1
    return None if acc is None else acc / count


class _IndexSums:
    """Per-index sums of the groups' tensors (``|w|**power`` of the weights, or a saliency),
    each tensor reduced once.

    The first request for a tensor reduces it along *every* dim any group slices it on (one
    read of the tensor, vectorised over its elements); later requests are lookups. Tied
    parameters share one entry (their canonical name). ``source`` maps canonical names to the
    tensors to reduce instead of the parameters themselves (element-wise saliencies).
    """

    def __init__(self, groups: Sequence[UnitGroup], table: Mapping[str, _Tensor],
                 source: Mapping[str, torch.Tensor] | None = None):
        self.table = table
        self.source = source
        self.dims: dict[str, set[int]] = defaultdict(set)
        for g in groups:
            for s in g.slices:
                entry = table[s.param]
                if entry.is_param:
                    self.dims[entry.canonical].add(s.dim % max(entry.tensor.dim(), 1))
        self._sums: dict[tuple[str, int], dict[int, np.ndarray]] = {}

    def _tensor(self, canonical: str, name: str) -> torch.Tensor:
        return self.source[canonical] if self.source is not None else self.table[name].tensor

    def vector(self, name: str, dim: int, power: int = 0) -> np.ndarray:
        entry = self.table[name]
        key = (entry.canonical, power)
        d = dim % max(entry.tensor.dim(), 1)
        if key not in self._sums:
            dims = self.dims.get(entry.canonical) or {d}
            self._sums[key] = _index_sums(self._tensor(entry.canonical, name), dims, power)
        if d not in self._sums[key]:  # a dim no group declared (direct callers)
            self._sums[key].update(_index_sums(self._tensor(entry.canonical, name), (d,), power))
        return self._sums[key][d]

    def per_unit(self, s: ParamSlice, power: int = 0) -> np.ndarray:
        return self.vector(s.param, s.dim, power)[s.index].sum(axis=1)


def _magnitude(
    group: UnitGroup, table: Mapping[str, _Tensor], power: int, roles: Sequence[str],
    cache: _IndexSums | None = None,
) -> np.ndarray | None:
    """Normalised mean of per-unit |w|^power over the group's slices with the given roles.

    ``cache`` (an :class:`_IndexSums`) reduces each tensor once for all groups: in concat-heavy
    models (DenseNet) one layer's input is sliced by dozens of groups.
    """
    cache = _IndexSums([group], table) if cache is None else cache
    vectors = [cache.per_unit(s, power) for s in group.slices
               if s.role in roles and table[s.param].is_param]
    return _normalised_mean(vectors) if vectors else None


def _magnitude_scores(
    group: UnitGroup, table: Mapping[str, _Tensor], criterion: str, notes: dict[int, str],
    cache: _IndexSums | None = None,
) -> np.ndarray:
    """l1 / l2 / bn_scale for one group, with the fallbacks described in the module doc."""
    if criterion == "bn_scale":
        scores = _magnitude(group, table, 1, ("norm",), cache)
        if scores is not None:
            return scores
        notes[group.id] = "no norm slice with a non-zero scale: scored with l1"
        criterion = "l1"
    power = 1 if criterion == "l1" else 2
    scores = _magnitude(group, table, power, ("producer", "consumer"), cache)
    if scores is None:
        scores = _magnitude(group, table, power, ("norm", "other"), cache)
        if scores is not None:
            notes[group.id] = (
                f"no producer/consumer weight with non-zero {criterion}: scored on its other parameters"
            )
    if scores is None:
        notes[group.id] = f"every weight of the group is zero: {criterion} is zero for all units"
        scores = np.zeros(group.n_units)
    return scores


def _saliency_scores(
    group: UnitGroup, table: Mapping[str, _Tensor], saliency: Mapping[str, torch.Tensor] | _IndexSums,
    criterion: str,
) -> np.ndarray:
    """Sum the element-wise saliency over every parameter slice of each unit (abs after, for taylor).

    ``saliency``: ``{canonical name: element-wise tensor}``, or an :class:`_IndexSums` over it
    (shared between groups, so each tensor is reduced once).
    """
    sums = saliency if isinstance(saliency, _IndexSums) else _IndexSums([group], table, saliency)
    total = np.zeros(group.n_units)
    for s in group.slices:
        if table[s.param].is_param:
            total += sums.per_unit(s)
    return np.abs(total) if criterion == "taylor" else total


def group_importance(
    model: nn.Module,
    groups: Sequence[UnitGroup],
    criterion: str = "l1",
    *,
    data: Any = None,
    loss_fn: LossFn | None = None,
    max_batches: int = 8,
    seed: int = 0,
) -> ImportanceScores:
    """Per-unit importance for each group (float64 ``[n_units]``, higher = keep).

    Args:
        model: any ``nn.Module``; never modified.
        groups: the dependency groups, as :class:`UnitGroup`.
        criterion: one of :data:`CRITERIA` (see the module doc for each definition).
        data: calibration data; required by ``taylor``, ``snip`` and ``grasp``; ``synflow`` reads
            the shape of one example.
        loss_fn: optional ``loss_fn(output, y)`` (or ``loss_fn(output)`` for unlabelled batches).
        max_batches: batches the gradient is averaged over.
        seed: seed of the ``random`` criterion.

    Returns:
        :class:`ImportanceScores`, a ``{group.id: scores}`` dict with ``notes`` for fallbacks.

    Raises:
        DataError: data missing, empty or not fitting the model (checked before any work).
        ValueError: unknown criterion, or a slice that does not fit its tensor.

    Example:
        >>> conv = nn.Conv2d(3, 4, 3)
        >>> g = UnitGroup(0, 4, (ParamSlice("weight", 0, np.arange(4)[:, None], "producer"),))
        >>> group_importance(conv, [g], "l1")[0].shape
        (4,)
    """
    criterion = _check_criterion(criterion, CRITERIA)
    groups = list(groups)
    table = _tensor_table(model)
    _check_groups(groups, table)
    notes: dict[int, str] = {}
    if criterion == "random":
        scores = {g.id: np.random.default_rng([seed, g.id]).random(g.n_units) for g in groups}
    elif criterion == "uniform":
        scores = {g.id: np.ones(g.n_units) for g in groups}
    elif criterion in ("l1", "l2", "bn_scale"):
        cache = _IndexSums(groups, table)
        scores = {g.id: _magnitude_scores(g, table, criterion, notes, cache)
                  for g in progress.bar(groups, desc=f"importance ({criterion})", unit="group")}
    elif criterion == "taylor":
        scores = _taylor_scores(model, groups, table, data, loss_fn, max_batches)
    elif criterion in ACTIVATION_CRITERIA:
        scores = _activation_scores(model, groups, table, data, criterion, max_batches, notes)
    else:
        saliency = _saliencies(model, (criterion,), data, loss_fn, max_batches)[criterion]
        sums = _IndexSums(groups, table, saliency)
        scores = {g.id: _saliency_scores(g, table, sums, criterion) for g in groups}
    if notes:
        logger.warning("%s importance: %d group(s) scored differently: %s", criterion, len(notes), notes)
    return ImportanceScores({k: np.asarray(v, dtype=np.float64) for k, v in scores.items()}, criterion, notes)


def _micro_batches(batches: Sequence[Batch], size: int) -> list[Batch]:
    """Split batches into micro-batches of at most ``size`` examples (keyword inputs and labels too)."""
    out = []
    for b in batches:
        n = b.size
        if n <= size:
            out.append(b)
            continue
        for i in range(0, n, size):
            cut = lambda t: t[i:i + size] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == n else t  # noqa: E731
            out.append(Batch(tuple(cut(a) for a in b.args), {k: cut(v) for k, v in b.kwargs.items()},
                             cut(b.target) if b.target is not None else None))
    return out


def _taylor_scores(model: nn.Module, groups: Sequence[UnitGroup], table: Mapping[str, _Tensor], data: Any,
                   loss_fn: LossFn | None, max_batches: int, micro: int = 16, max_micro: int = 32) -> dict[int, np.ndarray]:
    """First-order Taylor importance, ``mean_b (Σ_{P(u)} w·g_b)²`` over micro-batches ``b``.

    Squaring per micro-batch (Molchanov et al. 2019) matters on trained models: at a minimum the
    *mean* gradient vanishes and ``|Σ w·ḡ|`` is noise, while per-batch contributions do not. The
    sum runs over the unit's *consumer* slices (the input side of the layers that read it), which
    is exactly what pruning removes; groups without consumer slices use all their slices.
    """
    if data is None:
        raise DataError("criterion 'taylor' needs calibration data (data=...), got None")
    batches = _micro_batches(collect_batches(data, max_batches), micro)[:max_micro]
    device = model_device(model)
    named = list(model.named_parameters())
    params = [p for _, p in named]
    index = {n: i for i, (n, _) in enumerate(named)}
    use = {g.id: [sl for sl in g.slices if sl.role == "consumer" and table[sl.param].is_param]
           or [sl for sl in g.slices if table[sl.param].is_param] for g in groups}
    acc = {g.id: np.zeros(g.n_units) for g in groups}
    dims: dict[str, set[int]] = defaultdict(set)
    for g in groups:
        for sl in use[g.id]:
            dims[table[sl.param].canonical].add(sl.dim % max(table[sl.param].tensor.dim(), 1))
    with preserved_state(model, train=False, requires_grad=True), torch.enable_grad():
        _validate(model, batches, loss_fn, device)
        for i, batch in enumerate(progress.bar(batches, desc="importance (taylor)", unit="batch")):
            loss = _batch_loss(model, batch.to(device), loss_fn, i)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            loss = None
            sums: dict[str, dict[int, np.ndarray] | None] = {}  # w·g reduced per index, once per tensor
            for g in groups:
                c = np.zeros(g.n_units)
                for sl in use[g.id]:
                    name = table[sl.param].canonical
                    if name not in sums:
                        j = index[name]
                        gr = grads[j]
                        sums[name] = _index_sums(params[j].detach() * gr, dims[name]) if gr is not None else None
                    if sums[name] is not None:
                        c += sums[name][sl.dim % max(table[sl.param].tensor.dim(), 1)][sl.index].sum(axis=1)
                acc[g.id] += c * c
            grads = None
    return {k: v / len(batches) for k, v in acc.items()}


# --------------------------------------------------------------------------------------------
# Zero-cost-proxy features (ARLP-style policy state)
# --------------------------------------------------------------------------------------------


def _stats(prefix: str, per_unit: np.ndarray, model_total: float) -> dict[str, float]:
    total = float(per_unit.sum())
    mean = float(per_unit.mean()) if per_unit.size else 0.0
    std = float(per_unit.std()) if per_unit.size else 0.0
    return {
        f"{prefix}_sum": total,
        f"{prefix}_mean": mean,
        f"{prefix}_cv": std / abs(mean) if mean else 0.0,
        f"{prefix}_share": total / model_total if model_total else 0.0,
    }


def group_features(
    model: nn.Module,
    groups: Sequence[UnitGroup],
    *,
    data: Any = None,
    loss_fn: LossFn | None = None,
    max_batches: int = 8,
) -> dict[int, dict[str, float]]:
    """Per-group zero-cost-proxy features for ratio policies (ARLP's per-layer proxy features).

    Every group gets ``n_units``, ``params_per_unit`` (parameter elements one unit removes) and
    ``param_share`` (the group's parameters over the model's). For each proxy ``P`` in ``l1``,
    ``l2`` (raw, unnormalised per-unit sums over producer and consumer slices) and, when ``data``
    is given, ``synflow``, ``snip`` and ``grasp`` (per-unit scores as in :func:`group_importance`),
    the features ``P_sum``, ``P_mean``, ``P_cv`` (std / |mean|: how uneven the units are) and
    ``P_share`` (the group's sum over the model-wide sum of the element-wise ``|score|``, so in
    [0, 1] for the non-negative proxies and in [-1, 1] for GraSP). Without data the data-dependent
    keys are absent.

    Args:
        model: any ``nn.Module``; never modified.
        groups: the dependency groups.
        data: calibration data (optional).
        loss_fn: optional loss, as in :func:`group_importance`.
        max_batches: batches the gradients are averaged over.

    Returns:
        ``{group.id: {feature: value}}``.
    """
    groups = list(groups)
    table = _tensor_table(model)
    _check_groups(groups, table)
    params = dict(model.named_parameters())
    n_params = sum(p.numel() for p in params.values())
    magnitude_total = {
        name: sum(float(_index_sums(p, (0,), power)[0].sum()) for p in params.values())
        for name, power in (("l1", 1), ("l2", 2))
    }
    magnitudes = _IndexSums(groups, table)
    saliency: dict[str, dict[str, torch.Tensor]] = {}
    if data is not None:
        saliency = _saliencies(model, ("synflow", "snip", "grasp"), data, loss_fn, max_batches)
    saliency_total = {name: sum(float(v.abs().sum()) for v in sal.values()) for name, sal in saliency.items()}
    saliency_sums = {name: _IndexSums(groups, table, sal) for name, sal in saliency.items()}
    features: dict[int, dict[str, float]] = {}
    for g in groups:
        per_unit_params = sum(
            table[s.param].tensor.numel() // max(table[s.param].tensor.shape[s.dim], 1) * s.index.shape[1]
            for s in g.slices
            if table[s.param].is_param
        )
        f = {
            "n_units": float(g.n_units),
            "params_per_unit": float(per_unit_params),
            "param_share": per_unit_params * g.n_units / n_params if n_params else 0.0,
        }
        for name, power in (("l1", 1), ("l2", 2)):
            raw = [
                magnitudes.per_unit(s, power)
                for s in g.slices
                if s.role in ("producer", "consumer") and table[s.param].is_param
            ]
            f.update(_stats(name, np.sum(raw, axis=0) if raw else np.zeros(g.n_units), magnitude_total[name]))
        for name in saliency:
            f.update(_stats(name, _saliency_scores(g, table, saliency_sums[name], name), saliency_total[name]))
        features[g.id] = f
    return features


# --------------------------------------------------------------------------------------------
# Activation importance (Minitron)
# --------------------------------------------------------------------------------------------


class _ChannelStats:
    """Per-channel ``Σ|x|``, ``Σx²`` and the token count of one layer input (float64, CPU)."""

    def __init__(self, dim: int):
        self.dim = dim
        self.abs: torch.Tensor | None = None
        self.sq: torch.Tensor | None = None
        self.count = 0.0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        x = x.detach()
        if not x.is_floating_point():
            return
        d = self.dim % x.dim()
        x = x.movedim(d, -1).double()
        w = None
        if mask is not None:
            lead = x.shape[:-1]
            if tuple(mask.shape) == tuple(lead[: mask.dim()]) and mask.dim() == len(lead):
                w = mask.to(x.device, torch.float64)
            elif mask.numel() == lead.numel():
                w = mask.reshape(lead).to(x.device, torch.float64)
        flat = x.reshape(-1, x.shape[-1])
        if w is None:
            a, q, n = flat.abs().sum(0), flat.pow(2).sum(0), float(flat.shape[0])
        else:
            wf = w.reshape(-1, 1)
            a, q, n = (flat.abs() * wf).sum(0), (flat.pow(2) * wf).sum(0), float(wf.sum())
        a, q = a.cpu(), q.cpu()
        self.abs = a if self.abs is None else self.abs + a
        self.sq = q if self.sq is None else self.sq + q
        self.count += n


def _consumer_sites(model: nn.Module, names: set[str], table: Mapping[str, _Tensor]) -> dict[str, Any]:
    """Where each consumer tensor is read: ``{canonical name: [(site, input position, channel dim)]}``.

    A site is a module (its forward input) or, in a ``torch.fx.GraphModule``, a call_function node
    (``F.linear`` / ``aten.linear`` / ``addmm`` on a ``get_attr`` of the tensor). Only reads whose
    channel dim is known are listed: linear weight dim 1 (input's last dim), dense conv weight dim 1
    (input dim 1), Conv1D/addmm weight dim 0 (input's last dim).
    """
    import torch.fx

    by_id: dict[int, str] = {}
    for name in names:
        by_id[id(table[name].tensor)] = name
    sites: dict[tuple[str, int], list[tuple[Any, int, int]]] = {}

    def add(name, dim, site, pos, cdim):
        sites.setdefault((name, dim), []).append((site, pos, cdim))

    for path, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or id(w) not in by_id:
            continue
        name = by_id[id(w)]
        if isinstance(mod, nn.Linear):
            add(name, 1, mod, 0, -1)
        elif isinstance(mod, nn.modules.conv._ConvNd) and not mod.transposed and mod.groups == 1:
            add(name, 1, mod, 0, 1)
    if isinstance(model, torch.fx.GraphModule):
        linear = {F.linear, torch.ops.aten.linear.default}
        addmm = {torch.addmm, torch.ops.aten.addmm.default}
        for node in model.graph.nodes:
            if node.op != "call_function" or node.target not in linear | addmm:
                continue
            pos_w, pos_x, wdim = (1, 0, 1) if node.target in linear else (2, 1, 0)
            if len(node.args) <= pos_w:
                continue
            w = node.args[pos_w]
            if not (isinstance(w, torch.fx.Node) and w.op == "get_attr"):
                continue
            try:
                t = model.get_parameter(str(w.target))
            except AttributeError:
                continue
            if id(t) in by_id:
                add(by_id[id(t)], wdim, node, pos_x, -1)
    return sites


def _record(model: nn.Module, batches: Sequence[Batch], sites: Mapping, device: torch.device) -> dict:
    """Run the calibration batches, accumulating the input statistics of every site."""
    import torch.fx

    stats = {}
    module_sites: dict[int, list] = {}
    node_sites: dict[Any, list] = {}
    for key, entries in sites.items():
        for site, pos, cdim in entries:
            st = stats.setdefault((key, id(site), pos), _ChannelStats(cdim))
            (module_sites.setdefault(id(site), []) if isinstance(site, nn.Module)
             else node_sites.setdefault(site, [])).append((pos, st))
    mask_box: list[torch.Tensor | None] = [None]
    handles = []
    modules = {id(m): m for m in model.modules()}
    for mid, entries in module_sites.items():
        def hook(mod, args, kwargs, entries=entries):
            for pos, st in entries:
                x = args[pos] if pos < len(args) else None
                if isinstance(x, torch.Tensor):
                    st.add(x, mask_box[0])
        handles.append(modules[mid].register_forward_pre_hook(hook, with_kwargs=True))
    interp = None
    if node_sites and isinstance(model, torch.fx.GraphModule):
        class _Tap(torch.fx.Interpreter):
            def run_node(self, n):
                if n in node_sites:
                    args, _ = self.fetch_args_kwargs_from_env(n)
                    for pos, st in node_sites[n]:
                        if pos < len(args) and isinstance(args[pos], torch.Tensor):
                            st.add(args[pos], mask_box[0])
                return super().run_node(n)

        interp = _Tap(model)
        placeholders = [str(n.target) for n in model.graph.nodes if n.op == "placeholder"]
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches):
                batch = batch.to(device)
                mask = batch.kwargs.get("attention_mask")
                mask_box[0] = mask if isinstance(mask, torch.Tensor) else None
                if interp is not None:
                    flat = list(batch.args)
                    for name in placeholders[len(flat):]:
                        if name not in batch.kwargs:
                            raise DataError(f"batch {i}: the graph's input {name!r} is missing (got {batch.describe()})")
                        flat.append(batch.kwargs[name])
                    interp.run(*flat)
                else:
                    forward(model, batch, index=i)
    finally:
        for h in handles:
            h.remove()
    return stats


def _activation_scores(model: nn.Module, groups: Sequence[UnitGroup], table: Mapping[str, _Tensor], data: Any,
                       criterion: str, max_batches: int, notes: dict[int, str]) -> dict[int, np.ndarray]:
    """``activation`` / ``activation_l2`` (see the module doc)."""
    if data is None:
        raise DataError(f"criterion {criterion!r} needs calibration data (data=...), got None")
    batches = collect_batches(data, max_batches)
    consumers = {g.id: [sl for sl in g.slices if sl.role == "consumer" and table[sl.param].is_param] for g in groups}
    names = {table[sl.param].canonical for sls in consumers.values() for sl in sls}
    canonical_table = {table[n].canonical: table[n] for n in table}
    sites = _consumer_sites(model, names, canonical_table)
    with preserved_state(model, train=False):
        stats = _record(model, batches, sites, model_device(model))
    per_key: dict[tuple[str, int], list[_ChannelStats]] = {}
    for (key, _, _), st in stats.items():
        if st.count > 0 and st.abs is not None:
            per_key.setdefault(key, []).append(st)
    out: dict[int, np.ndarray] = {}
    cache = _IndexSums(groups, table)  # the l2 fallback reduces each tensor once
    for g in groups:
        vectors = []
        for sl in consumers[g.id]:
            for st in per_key.get((table[sl.param].canonical, sl.dim % table[sl.param].tensor.dim()), []):
                if criterion == "activation":
                    per_channel = (st.abs / st.count).numpy()
                    vectors.append(per_channel[sl.index].sum(axis=1))
                else:
                    per_channel = (st.sq / st.count).numpy()
                    vectors.append(np.sqrt(per_channel[sl.index].sum(axis=1)))
        scores = _normalised_mean(vectors) if vectors else None
        if scores is None:
            notes[g.id] = "no layer reading this group's channels could be observed: scored with l2"
            scores = _magnitude_scores(g, table, "l2", notes, cache)
        out[g.id] = scores
    return out
