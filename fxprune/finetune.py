"""Recovery fine-tuning after pruning: a plain, dependable training loop.

:func:`finetune` trains any ``nn.Module`` (a ``torch.fx.GraphModule`` included) in place:

* **Mode**: train mode during the loop (BatchNorm statistics update, dropout on), eval mode at
  the end. A teacher runs in eval mode under ``no_grad`` and gets its own mode back afterwards.
* **Loss**: the hard loss is ``loss_fn(output, y)`` (cross-entropy by default) on labelled batches,
  or ``loss_fn(output)`` on unlabelled batches when a ``loss_fn`` is given. With a teacher, the
  distillation term is ``T² · KL(softmax(t/T) || softmax(s/T))`` for class logits (2-D outputs
  with more than one column; the ``T²`` keeps gradient sizes independent of ``T``, Hinton et al.
  2015) and the mean squared error between outputs otherwise (embeddings, hidden states). Both
  together mix as ``(1 - kd_alpha)·hard + kd_alpha·kd``; either alone is used as is. Batches
  with neither labels, a teacher nor a ``loss_fn`` are a :class:`DataError`.
* **Causal language models** (the output has 3-D ``logits``, as Hugging Face ``*ForCausalLM`` and
  their pruned graphs return): distillation is token-level, ``T²·KL(p_teacher || p_student)`` over
  the vocabulary at every position, averaged over the tokens whose ``attention_mask`` is 1
  (padding is masked out); ``T`` defaults to 1 for them. Labels (``labels`` in the batch dict,
  ``-100`` ignored) give the shifted next-token cross-entropy as the hard loss.
* **Optimiser**: SGD with Nesterov momentum (lr 0.01, weight decay 1e-4 by default) or AdamW
  (lr 1e-4, weight decay 0.01). Weight decay applies to tensors with more than one dim only
  (conv/linear weights, not biases or norm affines). Frozen parameters stay frozen.
* **Schedule**: ``"cosine"`` (default) decays the learning rate per step from ``lr`` towards 0
  over the run, ``lr·(1 + cos(π·t/T))/2``: recovery runs are short, and annealing to a small rate
  settles the pruned weights without a schedule to tune. ``"constant"`` keeps ``lr`` flat. When
  the number of steps is unknown (an iterable without ``len`` and no ``max_steps``) the cosine
  schedule falls back to constant, with a log message.
* **Data**: a ``DataLoader``, a list of batches, any re-iterable of batches, or raw tensors
  ``x`` / ``(x, y)``, which are wrapped in a shuffling loader of ``batch_size``. Batch formats
  are those of :mod:`fxprune.importance`.
* **Distributed**: under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialised if
  needed (NCCL when training on CUDA, else gloo) and destroyed at the end if fxprune created it;
  each rank trains on ``cuda:LOCAL_RANK`` when CUDA is available and no ``device`` is given. The
  model is wrapped in ``DistributedDataParallel`` (``find_unused_parameters=True``, so models
  whose auxiliary heads go unused still train); a ``DataLoader`` over a map-style ``Dataset`` is
  rebuilt with a ``DistributedSampler`` and the same batch size; a list of batches is split
  round-robin into equal shares. Only rank 0 shows progress. At the end floating buffers
  (BatchNorm statistics) are averaged over the ranks and the others taken from rank 0, so every
  rank returns the same model: the unwrapped module. The user's script needs no change.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, TensorDataset
from tqdm import tqdm

from fxprune.errors import ConfigError, DataError, FxpruneError
from fxprune.importance import (
    LossFn,
    compute_loss,
    forward,
    is_logits,
    is_xy_pair,
    iter_batches,
    model_device,
    output_tensor,
    to_batch,
)

__all__ = ["FinetuneResult", "finetune", "distillation_loss", "token_distillation_loss", "causal_lm_loss"]

logger = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
_DEFAULTS = {"sgd": {"lr": 1e-2, "weight_decay": 1e-4}, "adamw": {"lr": 1e-4, "weight_decay": 1e-2}}


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns.

    Attributes:
        model: the trained model (the same object that was passed in, unwrapped, in eval mode).
        history: the loss of every optimiser step, in order (this rank's loss under torchrun).
        epochs: epochs started (the last may be partial when ``max_steps`` stopped the run).
        steps: optimiser steps taken.
        seconds: wall-clock time of the loop.
        final_lr: learning rate of the last step.
        rank: this process's rank (0 when not distributed).
        world_size: number of processes (1 when not distributed).
    """

    model: nn.Module
    history: list[float] = field(default_factory=list)
    epochs: int = 0
    steps: int = 0
    seconds: float = 0.0
    final_lr: float = 0.0
    rank: int = 0
    world_size: int = 1


# --------------------------------------------------------------------------------------------
# Distributed context
# --------------------------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None
    created: bool = False

    @property
    def active(self) -> bool:
        return self.world_size > 1


def _setup_distributed(device: torch.device | None) -> _Dist:
    """Initialise the process group under torchrun (``WORLD_SIZE > 1``) when nobody did yet."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return _Dist(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    created = False
    if not dist.is_initialized():
        on_cuda = torch.cuda.is_available() and (device is None or device.type == "cuda")
        if on_cuda:
            torch.cuda.set_device(local_rank if device is None or device.index is None else device.index)
        dist.init_process_group(backend="nccl" if on_cuda else "gloo")
        created = True
    if device is None and dist.get_backend() == "nccl":
        device = torch.device("cuda", local_rank)
    info = _Dist(dist.get_rank(), dist.get_world_size(), device, created)
    logger.info("finetune: rank %d of %d (backend %s)", info.rank, info.world_size, dist.get_backend())
    return info


# --------------------------------------------------------------------------------------------
# Data sources
# --------------------------------------------------------------------------------------------


class _Source:
    """Re-iterable batches for each epoch, sharded across ranks when distributed."""

    def __init__(self, data: Any, batch_size: int, ctx: _Dist, seed: int):
        self.sampler: DistributedSampler | None = None
        self.items: Iterable[Any] = self._build(data, batch_size, ctx, seed)

    def _build(self, data: Any, batch_size: int, ctx: _Dist, seed: int) -> Iterable[Any]:
        if isinstance(data, DataLoader):
            return self._shard_loader(data, ctx, seed) if ctx.active else data
        if isinstance(data, (torch.Tensor, tuple)) or (isinstance(data, list) and is_xy_pair(data)):
            return self._tensor_loader(data, batch_size, ctx, seed)
        if isinstance(data, list):
            if ctx.active:
                share = len(data) // ctx.world_size
                if share == 0:
                    logger.warning(
                        "finetune: %d batches for %d ranks; every rank uses all", len(data), ctx.world_size
                    )
                    return data
                return data[ctx.rank :: ctx.world_size][:share]
            return data
        if data is None or isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
            raise DataError(
                f"expected a DataLoader, a list of batches or tensors (x, y), got {type(data).__name__}"
            )
        if ctx.active:
            logger.warning(
                "finetune: cannot shard a %s across ranks; every rank reads all of it", type(data).__name__
            )
        return data

    def _tensor_loader(self, data: Any, batch_size: int, ctx: _Dist, seed: int) -> DataLoader:
        batch = next(iter_batches(data))  # validates the form and the label count
        if batch.kwargs or len(batch.args) != 1:
            raise DataError("raw tensor training data must be x or (x, y); use a DataLoader for other inputs")
        tensors = (batch.args[0],) if batch.target is None else (batch.args[0], batch.target)
        dataset = TensorDataset(*tensors)
        generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
        return self._shard_loader(loader, ctx, seed) if ctx.active else loader

    def _shard_loader(self, loader: DataLoader, ctx: _Dist, seed: int) -> DataLoader:
        """The same loader with a DistributedSampler (same batch size, workers and collate)."""
        if isinstance(loader.sampler, DistributedSampler):
            self.sampler = loader.sampler
            return loader
        if isinstance(loader.dataset, IterableDataset) or loader.batch_size is None:
            logger.warning(
                "finetune: the DataLoader uses an IterableDataset or a batch_sampler, which fxprune cannot "
                "shard; every rank reads all of it (its length must be equal on every rank)"
            )
            return loader
        self.sampler = DistributedSampler(
            loader.dataset,
            num_replicas=ctx.world_size,
            rank=ctx.rank,
            shuffle=isinstance(loader.sampler, RandomSampler),
            seed=seed,
            drop_last=loader.drop_last,
        )
        workers = loader.num_workers
        return DataLoader(
            loader.dataset,
            batch_size=loader.batch_size,
            sampler=self.sampler,
            num_workers=workers,
            collate_fn=loader.collate_fn,
            pin_memory=loader.pin_memory,
            drop_last=loader.drop_last,
            timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context if workers else None,
            prefetch_factor=loader.prefetch_factor if workers else None,
            persistent_workers=loader.persistent_workers if workers else False,
        )

    def __len__(self) -> int:
        return len(self.items)  # type: ignore[arg-type]

    def epoch(self, epoch: int) -> Iterator[Any]:
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        return iter(self.items)


def _steps_per_epoch(source: _Source) -> int | None:
    try:
        return len(source)
    except TypeError:
        return None


# --------------------------------------------------------------------------------------------
# Optimiser, schedule, loss
# --------------------------------------------------------------------------------------------


def _make_optimizer(
    model: nn.Module, optimizer: str | Callable, lr: float, weight_decay: float
) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(
            "finetune: the model has no trainable parameters (requires_grad is False everywhere)"
        )
    if callable(optimizer):
        return optimizer(params)
    groups = [
        {"params": [p for p in params if p.dim() > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)


def _lr_factor(schedule: str, total: int | None) -> Callable[[int], float]:
    if schedule == "constant" or not total:
        return lambda step: 1.0
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T²·KL(softmax(t/T) || softmax(s/T))`` (batch mean) for logits, MSE for other outputs."""
    teacher = teacher.detach().to(student.dtype)
    if is_logits(student):
        log_s = F.log_softmax(student / temperature, dim=1)
        log_t = F.log_softmax(teacher / temperature, dim=1)
        return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2
    return F.mse_loss(student, teacher)


def token_logits(out: Any) -> torch.Tensor | None:
    """The ``[batch, tokens, vocab]`` logits of a causal LM output (``out.logits`` / ``out["logits"]``),
    else None."""
    logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    return logits if isinstance(logits, torch.Tensor) and logits.dim() == 3 and logits.is_floating_point() else None


def token_distillation_loss(student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor | None,
                            temperature: float = 1.0) -> torch.Tensor:
    """``T²·KL(softmax(t/T) || softmax(s/T))`` over the vocabulary per token, averaged over the tokens
    where ``attention_mask`` is 1 (all tokens without a mask)."""
    teacher = teacher.detach().to(student.dtype)
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # [batch, tokens]
    if attention_mask is not None and tuple(attention_mask.shape) == tuple(kl.shape):
        w = attention_mask.to(kl.dtype)
        return (kl * w).sum() / w.sum().clamp(min=1.0) * temperature**2
    return kl.mean() * temperature**2


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Next-token cross-entropy: ``logits[:, t]`` predicts ``labels[:, t + 1]``; label ``-100`` and
    padding (``attention_mask`` 0) are ignored."""
    labels = labels.clone()
    if attention_mask is not None and attention_mask.shape == labels.shape:
        labels[attention_mask == 0] = -100
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class _Step:
    """Everything one optimiser step needs."""

    net: nn.Module
    teacher: nn.Module | None
    loss_fn: LossFn | None
    kd_alpha: float
    kd_temperature: float | None
    output_key: str | None
    device: torch.device

    def loss(self, item: Any, index: int) -> torch.Tensor:
        batch = to_batch(item, index).to(self.device)
        raw = forward(self.net, batch, index=index)
        logits = token_logits(raw) if self.output_key is None else None
        if logits is not None:
            return self._lm_loss(batch, logits, index)
        out = output_tensor(raw, self.output_key)
        hard = None
        if batch.target is not None or self.loss_fn is not None:
            hard = compute_loss(out, batch.target, self.loss_fn, index=index)
        if self.teacher is None:
            if hard is None:
                raise DataError(
                    f"batch {index} has no labels: expected (x, y) batches, a teacher= or a "
                    "label-free loss_fn="
                )
            return hard
        with torch.no_grad():
            t_out = output_tensor(forward(self.teacher, batch, index=index), self.output_key)
        kd = distillation_loss(out, t_out, self.kd_temperature if self.kd_temperature is not None else 4.0)
        return kd if hard is None else (1.0 - self.kd_alpha) * hard + self.kd_alpha * kd

    def _lm_loss(self, batch: Any, logits: torch.Tensor, index: int) -> torch.Tensor:
        """Causal LM: token-level distillation (padding masked) and/or next-token cross-entropy."""
        mask = batch.kwargs.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) else None
        hard = None
        if batch.target is not None:
            hard = causal_lm_loss(logits, batch.target, mask)
        elif self.loss_fn is not None:
            hard = compute_loss(logits, None, self.loss_fn, index=index)
        if self.teacher is None:
            if hard is None:
                raise DataError(f"batch {index} has no labels: pass a teacher= to distil, or 'labels' in the batch")
            return hard
        with torch.no_grad():
            t_raw = forward(self.teacher, batch, index=index)
            t_logits = token_logits(t_raw)
            t_logits = t_logits if t_logits is not None else output_tensor(t_raw)
        if t_logits.shape != logits.shape:
            raise DataError(f"batch {index}: the teacher's logits {list(t_logits.shape)} do not match the student's "
                            f"{list(logits.shape)}")
        kd = token_distillation_loss(logits, t_logits, mask,
                                     self.kd_temperature if self.kd_temperature is not None else 1.0)
        return kd if hard is None else (1.0 - self.kd_alpha) * hard + self.kd_alpha * kd


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def _check_args(
    model: Any, epochs: Any, max_steps: Any, optimizer: Any, schedule: Any, kd_alpha: Any, kd_temperature: Any, *,
    lr: Any = None, weight_decay: Any = None, batch_size: Any = 64, grad_clip: Any = None, seed: Any = 0,
    teacher: Any = None, loss_fn: Any = None, log: Any = None, device: Any = None,
) -> None:
    """Every option, checked before the model is touched (no raw torch errors, no silent NaN runs)."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"finetune needs an nn.Module, got {type(model).__name__}")
    if not _is_int(epochs) or epochs < 1:
        raise ConfigError(f"epochs must be an int >= 1, got {epochs!r}")
    if max_steps is not None and (not _is_int(max_steps) or max_steps < 1):
        raise ConfigError(f"max_steps must be an int >= 1 or None, got {max_steps!r}")
    if not _is_int(batch_size) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if lr is not None and not (_is_real(lr) and lr > 0):
        raise ConfigError(f"lr must be a finite number > 0, got {lr!r}")
    if weight_decay is not None and not (_is_real(weight_decay) and weight_decay >= 0):
        raise ConfigError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if grad_clip is not None and not (_is_real(grad_clip) and grad_clip > 0):
        raise ConfigError(f"grad_clip must be a finite number > 0 or None, got {grad_clip!r}")
    if not _is_int(seed):
        raise ConfigError(f"seed must be an int, got {seed!r}")
    if not callable(optimizer) and optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {OPTIMIZERS} or a callable(params), got {optimizer!r}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not (_is_real(kd_alpha) and 0.0 <= kd_alpha <= 1.0):
        raise ConfigError(f"kd_alpha must be a number in [0, 1], got {kd_alpha!r}")
    if kd_temperature is not None and not (_is_real(kd_temperature) and kd_temperature > 0):
        raise ConfigError(f"kd_temperature must be a finite number > 0 or None, got {kd_temperature!r}")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise ConfigError(f"teacher must be an nn.Module or None, got {type(teacher).__name__}")
    for name, fn in (("loss_fn", loss_fn), ("log", log)):
        if fn is not None and not callable(fn):
            raise ConfigError(f"{name} must be callable or None, got {type(fn).__name__}")
    if device is not None:
        try:
            torch.device(device)
        except (TypeError, RuntimeError) as err:
            raise ConfigError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from err


def finetune(
    model: nn.Module,
    train_data: Any,
    *,
    teacher: nn.Module | None = None,
    epochs: int = 1,
    lr: float | None = None,
    optimizer: str | Callable[[list[nn.Parameter]], torch.optim.Optimizer] = "sgd",
    weight_decay: float | None = None,
    loss_fn: LossFn | None = None,
    kd_alpha: float = 0.5,
    kd_temperature: float | None = None,
    schedule: str = "cosine",
    max_steps: int | None = None,
    batch_size: int = 64,
    grad_clip: float | None = None,
    output_key: str | None = None,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device | None = None,
    log: Callable[[dict[str, float]], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``model`` in place to recover accuracy after pruning (see the module doc).

    Args:
        model: any ``nn.Module``, e.g. the pruned ``torch.fx.GraphModule``; trained in place.
        train_data: DataLoader, list of batches, re-iterable of batches, or tensors ``x`` / ``(x, y)``.
        teacher: optional teacher (usually the unpruned model) for knowledge distillation.
        epochs: passes over the data.
        lr: peak learning rate (default 0.01 for SGD, 1e-4 for AdamW).
        optimizer: ``"sgd"``, ``"adamw"`` or a callable ``params -> Optimizer``.
        weight_decay: decay of weights with more than one dim (default 1e-4 SGD, 0.01 AdamW).
        loss_fn: ``loss_fn(output, y)``, or ``loss_fn(output)`` on unlabelled batches.
        kd_alpha: weight of the distillation term when labels and a teacher are both present.
        kd_temperature: distillation temperature ``T`` (default 4 for class logits, 1 for causal LM
            token logits).
        schedule: ``"cosine"`` or ``"constant"``.
        max_steps: stop after this many optimiser steps (over all epochs).
        batch_size: batch size used when ``train_data`` is raw tensors.
        grad_clip: clip the global gradient norm to this value.
        output_key: key of the output to train on when the model returns a dict.
        seed: seed of fxprune's own shuffling (raw tensors, DistributedSampler).
        progress: show a tqdm bar (only on rank 0, only on a terminal).
        device: train on this device (the model, and the teacher, are moved there).
        log: called after every step with ``{"step", "epoch", "loss", "lr"}``.

    Returns:
        :class:`FinetuneResult` with the unwrapped model (in eval mode) and the loss history.

    Raises:
        DataError: empty data, batches that do not fit the model, or no training signal.
        FxpruneError: the loss became NaN or infinite.
    """
    _check_args(model, epochs, max_steps, optimizer, schedule, kd_alpha, kd_temperature, lr=lr,
                weight_decay=weight_decay, batch_size=batch_size, grad_clip=grad_clip, seed=seed, teacher=teacher,
                loss_fn=loss_fn, log=log, device=device)
    opts = _Options(
        teacher=teacher,
        epochs=epochs,
        lr=lr,
        optimizer=optimizer,
        weight_decay=weight_decay,
        loss_fn=loss_fn,
        kd_alpha=kd_alpha,
        kd_temperature=kd_temperature,
        schedule=schedule,
        max_steps=max_steps,
        batch_size=batch_size,
        grad_clip=grad_clip,
        output_key=output_key,
        seed=seed,
        progress=progress,
        log=log,
    )
    ctx = _setup_distributed(torch.device(device) if device is not None else None)
    try:
        return _run(model, train_data, ctx, opts)
    finally:
        if ctx.created and dist.is_initialized():
            dist.destroy_process_group()


@dataclass(frozen=True)
class _Options:
    """The keyword arguments of :func:`finetune`, validated."""

    teacher: nn.Module | None
    epochs: int
    lr: float | None
    optimizer: Any
    weight_decay: float | None
    loss_fn: LossFn | None
    kd_alpha: float
    kd_temperature: float | None
    schedule: str
    max_steps: int | None
    batch_size: int
    grad_clip: float | None
    output_key: str | None
    seed: int
    progress: bool
    log: Callable[[dict[str, float]], None] | None

    def hyperparameters(self) -> tuple[float, float]:
        """Learning rate and weight decay, with the optimiser's defaults filled in."""
        defaults = _DEFAULTS["sgd" if callable(self.optimizer) else self.optimizer]
        lr = self.lr if self.lr is not None else defaults["lr"]
        wd = self.weight_decay if self.weight_decay is not None else defaults["weight_decay"]
        return lr, wd


def _run(model: nn.Module, train_data: Any, ctx: _Dist, opts: _Options) -> FinetuneResult:
    device = ctx.device or model_device(model)
    model.to(device)
    teacher = opts.teacher
    teacher_mode = [(m, m.training) for m in teacher.modules()] if teacher is not None else []
    if teacher is not None:
        teacher.to(device).eval()
    source = _Source(train_data, opts.batch_size, ctx, opts.seed)
    per_epoch = _steps_per_epoch(source)
    if per_epoch == 0:
        raise DataError(f"expected training batches, got an empty {type(train_data).__name__}")
    total = _total_steps(per_epoch, opts.epochs, opts.max_steps, opts.schedule)
    opt = _make_optimizer(model, opts.optimizer, *opts.hyperparameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(opts.schedule, total))
    net = model
    if ctx.active:
        ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
    step = _Step(net, teacher, opts.loss_fn, opts.kd_alpha, opts.kd_temperature, opts.output_key, device)
    result = FinetuneResult(model=model, rank=ctx.rank, world_size=ctx.world_size)
    quiet = not opts.progress or ctx.rank != 0
    bar = tqdm(total=total, desc="finetune", unit="step", disable=True if quiet else None)  # None: TTY only
    start = time.perf_counter()
    snapshot = _snapshot(model)
    try:
        net.train()
        _loop(step, source, opt, sched, result, bar, opts)
        _check_finite(model, result)
    except _NonFinite as err:
        _restore(snapshot)
        raise FxpruneError(f"{err} The model was restored to its weights before fine-tuning; lower the learning "
                           "rate or set grad_clip.") from None
    finally:
        bar.close()
        model.eval()
        for m, mode in teacher_mode:
            m.training = mode
    if ctx.active:
        _sync_buffers(model, ctx.world_size)
    result.seconds = time.perf_counter() - start
    last = f"{result.history[-1]:.4g}" if result.history else "n/a"
    logger.info(
        "finetune: %d steps, %d epoch(s), %.1fs, last loss %s",
        result.steps,
        result.epochs,
        result.seconds,
        last,
    )
    return result


class _NonFinite(Exception):
    """The loss or the weights became NaN or infinite."""


def _snapshot(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of every parameter and buffer, to undo a run that diverged."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return [(t, t.detach().clone()) for t in tensors.values()]


def _restore(snapshot: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for tensor, saved in snapshot:
            tensor.copy_(saved)


def _check_finite(model: nn.Module, result: FinetuneResult) -> None:
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise _NonFinite(f"finetune: after {result.steps} step(s) the weights are NaN or infinite "
                         f"({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}).")


def _sync_buffers(model: nn.Module, world_size: int) -> None:
    """Make every rank's buffers equal: average floating ones (BN statistics), rank 0's for the rest.

    DDP broadcasts rank 0's buffers before each forward, so after the last step every rank holds
    the statistics of its own last batch; averaging them uses all ranks' data.
    """
    with torch.no_grad():
        for b in model.buffers():
            if b.is_floating_point():
                dist.all_reduce(b, op=dist.ReduceOp.SUM)
                b.div_(world_size)
            else:
                dist.broadcast(b, src=0)


def _total_steps(per_epoch: int | None, epochs: int, max_steps: int | None, schedule: str) -> int | None:
    total = per_epoch * epochs if per_epoch is not None else None
    if max_steps is not None:
        total = max_steps if total is None else min(total, max_steps)
    if total is None and schedule == "cosine":
        logger.info("finetune: unknown number of steps (no len(), no max_steps): constant learning rate")
    return total


def _optimizer_step(
    step: _Step, item: Any, index: int, opt: torch.optim.Optimizer, sched: Any, grad_clip: float | None
) -> tuple[float, float]:
    """One forward/backward/update; returns the loss and the learning rate it used."""
    loss = step.loss(item, index)
    if not torch.isfinite(loss):
        raise _NonFinite(f"finetune: the loss became {loss.item()} at step {index}.")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], grad_clip)
    lr = float(opt.param_groups[0]["lr"])
    try:
        opt.step()
    except RuntimeError as err:  # a learning rate beyond the parameters' dtype range
        if "overflow" not in str(err):
            raise
        raise _NonFinite(f"finetune: the optimiser step overflowed at step {index} (lr {lr:g}: {err}).") from None
    sched.step()
    return float(loss.detach()), lr


def _loop(
    step: _Step,
    source: _Source,
    opt: torch.optim.Optimizer,
    sched: Any,
    result: FinetuneResult,
    bar: Any,
    opts: _Options,
) -> None:
    """Epochs of optimiser steps until the data or ``max_steps`` runs out."""
    for epoch in range(opts.epochs):
        result.epochs = epoch + 1
        seen = 0
        for item in source.epoch(epoch):
            loss, result.final_lr = _optimizer_step(step, item, result.steps, opt, sched, opts.grad_clip)
            result.history.append(loss)
            result.steps += 1
            seen += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
            if opts.log is not None:
                opts.log({"step": result.steps, "epoch": epoch, "loss": loss, "lr": result.final_lr})
            if opts.max_steps is not None and result.steps >= opts.max_steps:
                return
        if seen == 0:
            if epoch == 0:
                raise DataError(f"expected training batches, got an empty {type(source.items).__name__}")
            logger.warning("finetune: epoch %d yielded no batches (a one-shot iterator?); stopping", epoch)
            return
