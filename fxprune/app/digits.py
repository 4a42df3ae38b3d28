"""scikit-learn's 8x8 handwritten digits (1,797 images, shipped with scikit-learn, no
download) as a small real image-classification task for demos, benchmarks and tests.

Example:
    >>> data = load_digits_split()
    >>> tuple(data.x_train.shape[1:]), len(data.x_train) + len(data.x_test)
    ((1, 8, 8), 1797)
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn


@dataclasses.dataclass
class DigitsSplit:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def train_loader(self, batch_size: int = 64, seed: int = 0) -> list:
        return batches(self.x_train, self.y_train, batch_size, shuffle=True, seed=seed)

    def test_loader(self, batch_size: int = 256) -> list:
        return batches(self.x_test, self.y_test, batch_size, shuffle=False)


def load_digits_split(test_size: float = 0.25, seed: int = 0) -> DigitsSplit:
    """Fixed stratified train/test split, pixels scaled to [0, 1], shape (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_size, random_state=seed,
                                          stratify=y)
    return DigitsSplit(xtr, ytr, xte, yte)


def batches(x, y, batch_size, shuffle=True, seed=0) -> list:
    """A list of (inputs, targets) batches (a fixed shuffle per seed)."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) if shuffle \
        else torch.arange(len(x))
    return [(x[order[i:i + batch_size]], y[order[i:i + batch_size]])
            for i in range(0, len(x), batch_size)]


def train(model: nn.Module, data: DigitsSplit, epochs: int = 30, lr: float = 2e-3,
          weight_decay: float = 0.05, seed: int = 0) -> nn.Module:
    """Train ``model`` from scratch on the training split (AdamW, cosine decay)."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    model.train()
    for epoch in range(epochs):
        for x, y in data.train_loader(seed=seed * 1000 + epoch):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    return model


def accuracy(model, data: DigitsSplit) -> float:
    from fxprune.amap.search import evaluate

    return evaluate(model, data.test_loader())
