"""Tests of fxprune.finetune: the recovery loop, KD, fx graphs, schedules and torchrun."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fxprune.errors import DataError, FxpruneError
from fxprune.finetune import FinetuneResult, distillation_loss, finetune
from fxprune.quality import accuracy, fidelity

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0, torch.tensor(d.target)


def small_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(32, 10),
    )


def first_last(history: list[float], n: int = 5) -> tuple[float, float]:
    return float(np.mean(history[:n])), float(np.mean(history[-n:]))


def test_loss_decreases_and_bn_statistics_update(digits):
    x, y = digits
    model = small_cnn()
    running = model[1].running_mean.clone()
    res = finetune(model, (x, y), epochs=2, lr=0.1, batch_size=64, progress=False)
    assert isinstance(res, FinetuneResult) and res.model is model
    assert res.steps == res.epochs * 29 and res.epochs == 2 and len(res.history) == res.steps
    first, last = first_last(res.history)
    assert last < 0.8 * first
    assert not torch.equal(model[1].running_mean, running)
    assert model[1].num_batches_tracked.item() == res.steps
    assert not model.training and all(not m.training for m in model.modules())
    assert accuracy(model, (x, y)) > 0.5
    assert res.seconds > 0


def test_dataloader_with_dict_batches_and_max_steps(digits):
    x, y = digits
    items = [{"image": xi, "label": yi} for xi, yi in zip(x[:256], y[:256])]
    loader = DataLoader(items, batch_size=32, shuffle=True)
    res = finetune(small_cnn(), loader, epochs=5, max_steps=12, lr=0.05, optimizer="adamw", progress=False)
    assert res.steps == 12 and res.epochs == 2


def test_kd_from_teacher_without_labels(digits):
    x, y = digits[0][:640], digits[1][:640]
    teacher = small_cnn()
    finetune(teacher, (x, y), epochs=3, lr=0.1, progress=False)
    teacher.train()  # the teacher's mode must come back as it was
    student = small_cnn(seed=1)
    before = fidelity(teacher, student, x)
    res = finetune(student, x, teacher=teacher, epochs=3, lr=0.1, progress=False)
    first, last = first_last(res.history)
    assert last < 0.7 * first
    assert teacher.training
    assert fidelity(teacher, student, x) > before  # KL to the teacher went down


def test_kd_mixed_with_labels_on_graph_module(digits):
    x, y = digits[0][:256], digits[1][:256]
    teacher = small_cnn()
    student = torch.fx.symbolic_trace(small_cnn(seed=2))
    weights = copy.deepcopy(student.state_dict())
    logs: list[dict] = []
    res = finetune(
        student, (x, y), teacher=teacher, kd_alpha=0.3, epochs=1, lr=0.05, progress=False, log=logs.append
    )
    assert isinstance(res.model, torch.fx.GraphModule) and not student.training
    assert any(not torch.equal(student.state_dict()[k], v) for k, v in weights.items())
    assert [e["step"] for e in logs] == list(range(1, res.steps + 1))
    assert np.isfinite(res.history).all()


def test_distillation_loss_values():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    assert distillation_loss(t.clone(), t, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distillation_loss(s, t, 2.0).item() > 0
    emb = torch.randn(4, 3, 8)
    assert distillation_loss(emb + 1.0, emb, 4.0).item() == pytest.approx(1.0)  # MSE for non-logits


def test_cosine_and_constant_schedules(digits):
    x, y = digits
    for schedule in ("cosine", "constant"):
        lrs: list[float] = []
        finetune(small_cnn(), (x[:320], y[:320]), epochs=2, lr=0.1, batch_size=32, schedule=schedule,
                 progress=False, log=lambda e: lrs.append(e["lr"]))  # fmt: skip
        assert lrs[0] == pytest.approx(0.1)
        if schedule == "cosine":
            assert all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 0.01
            assert lrs[len(lrs) // 2] == pytest.approx(0.05, rel=1e-6)
        else:
            assert lrs == pytest.approx([0.1] * 20)


def test_frozen_parameters_stay_frozen(digits):
    x, y = digits
    model = small_cnn()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.clone()
    finetune(model, [(x[:64], y[:64]), (x[64:128], y[64:128])], epochs=2, progress=False)
    assert torch.equal(model[0].weight, frozen) and not model[0].weight.requires_grad


def test_finetune_errors(digits):
    x, y = digits
    with pytest.raises(DataError, match="empty"):
        finetune(small_cnn(), [], progress=False)
    with pytest.raises(DataError, match="empty"):
        finetune(small_cnn(), DataLoader(TensorDataset(x[:0], y[:0]), batch_size=8), progress=False)
    with pytest.raises(DataError, match="no labels"):
        finetune(small_cnn(), x[:32], progress=False)
    with pytest.raises(DataError, match=r"\[N, 1, H, W\]"):
        finetune(small_cnn(), (torch.randn(8, 3, 8, 8), y[:8]), progress=False)
    with pytest.raises(DataError, match="expected 8 labels"):
        finetune(small_cnn(), (x[:8], y[:7]), progress=False)
    with pytest.raises(FxpruneError, match="loss became"):
        finetune(small_cnn(), (x[:64] * float("inf"), y[:64]), progress=False)
    with pytest.raises(ValueError, match="optimizer"):
        finetune(small_cnn(), (x, y), optimizer="lbfgs")


DDP_SCRIPT = """
import os, sys
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from fxprune.finetune import finetune

torch.set_num_threads(1)
torch.manual_seed(0)
g = torch.Generator().manual_seed(0)
x = torch.randn(48, 1, 6, 6, generator=g)
y = (x.mean(dim=(1, 2, 3)) > 0).long()
model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
if os.environ["RANK"] == "1":  # a different start: DDP must broadcast rank 0's weights
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
model = torch.fx.symbolic_trace(model)
loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
res = finetune(model, loader, epochs=2, lr=0.05)
assert res.model is model and res.world_size == 2 and not model.training
assert not torch.distributed.is_initialized()  # fxprune created the group, fxprune destroyed it
torch.save({"state": model.state_dict(), "steps": res.steps, "rank": res.rank},
           os.path.join(sys.argv[1], f"rank{res.rank}.pt"))
"""


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    pythonpath = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = {**os.environ, "PYTHONPATH": pythonpath, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    cmd += [str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 2 * 3  # 48 examples / 2 ranks / batch 8, 2 epochs
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name


def test_package_level_finetune_stays_callable_after_submodule_import(digits):
    """``fxprune.finetune`` is the function, before and after ``import fxprune.finetune``."""
    import importlib

    import fxprune

    importlib.import_module("fxprune.finetune")
    assert callable(fxprune.finetune) and fxprune.finetune is finetune
    x, y = digits
    loader = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=32)
    for _ in range(2):  # the second call used to hit the module object
        res = fxprune.finetune(small_cnn(), loader, epochs=1, lr=0.05)
        assert isinstance(res, fxprune.FinetuneResult) and res.steps == 2
