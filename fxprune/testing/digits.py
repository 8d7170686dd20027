"""A small CNN trained on scikit-learn's digits (8x8 images, 10 classes): real data, no download."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["DigitsCNN", "DigitsData", "load_digits_data", "train_digits_cnn", "evaluate_accuracy"]


class DigitsCNN(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(1, w, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(w)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * w)
        self.conv3 = nn.Conv2d(2 * w, 2 * w, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(2 * w)
        self.conv4 = nn.Conv2d(2 * w, 4 * w, 3, padding=1)
        self.bn4 = nn.BatchNorm2d(4 * w)
        self.fc1 = nn.Linear(4 * w * 2 * 2, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.max_pool2d(x, 2)  # 4x4
        y = F.relu(self.bn3(self.conv3(x)))
        x = x + y
        x = F.relu(self.bn4(self.conv4(x)))
        x = F.max_pool2d(x, 2)  # 2x2
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


@dataclass
class DigitsData:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def train_batches(self, batch_size: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self.x_train), generator=g)
        return [(self.x_train[idx[i:i + batch_size]], self.y_train[idx[i:i + batch_size]])
                for i in range(0, len(idx), batch_size)]

    def calibration(self, n: int = 256):
        return [(self.x_train[:n], self.y_train[:n])]


def load_digits_data(seed: int = 0, test_fraction: float = 0.3) -> DigitsData:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.4
    y = torch.tensor(d.target, dtype=torch.long)
    rng = np.random.default_rng(seed)
    perm = torch.as_tensor(rng.permutation(len(x)))
    n_test = int(len(x) * test_fraction)
    te, tr = perm[:n_test], perm[n_test:]
    return DigitsData(x[tr], y[tr], x[te], y[te])


def evaluate_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was)
    return acc


def train_digits_cnn(data: DigitsData | None = None, *, epochs: int = 15, width: int = 32, seed: int = 0,
                     lr: float = 0.05, model_fn=None) -> tuple[nn.Module, DigitsData]:
    """Train the CNN (SGD, cosine LR, fixed seed); about 98-99% test accuracy in a few seconds.
    ``model_fn()`` builds another model to train the same way (after the seed is set)."""
    data = data or load_digits_data(seed)
    torch.manual_seed(seed)
    model = model_fn() if model_fn is not None else DigitsCNN(width)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * len(data.train_batches())
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for epoch in range(epochs):
        for xb, yb in data.train_batches(seed=seed + epoch):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            sched.step()
    model.eval()
    return model, data
