"""AMAP pruning indicators (paper section 3.1, eq. 1-4 and 7).

One :class:`Indicator` per prunable group holds the learnable pruning score ``m`` (one per
unit: a channel of a head, or a channel shared by every head). The convention is the paper's
read literally: a unit is KEPT when ``m* < tau`` (eq. 4), so ``m`` is a pruning score; it
starts at 0 (every unit kept), the MACs loss pushes it up and the task loss pushes the scores
of useful units down.

    m* = w * m                          similarity weight w >= 1 (eq. 1-3), from the weights
    m* <- rank-wise average over heads   (synchronisation, section 3.1; optional)
    keep = 1[m* < tau]                   straight-through: d keep / d m* = -1

Example:
    >>> import torch
    >>> ind = Indicator(group=0, channels=torch.arange(6).reshape(2, 3).numpy())
    >>> ind.keep().tolist()
    [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    >>> with torch.no_grad():
    ...     _ = ind.m.copy_(torch.tensor([[0.9, 0.0, 0.1], [0.0, 0.2, 0.7]]))
    >>> ind.keep().tolist()   # ranks averaged: [0.8, 0.15, 0.0] -> drop the top rank
    [[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from fxprune.amap.gates import batch_period, fit_index


class Indicator(nn.Module):
    """Learnable pruning scores of one group, shape (heads, units per head)."""

    def __init__(self, group: int, channels: np.ndarray, tau: float = 0.5,
                 similarity: bool = True, sync: bool = True, init: torch.Tensor | None = None):
        super().__init__()
        self.group = group
        self.tau = tau
        self.use_similarity = similarity
        self.sync = sync
        shape = channels.shape
        self.m = nn.Parameter(torch.zeros(shape) if init is None else init.float().clone())
        self.register_buffer("w", torch.ones(shape))
        self.channels = channels

    def weighted(self) -> torch.Tensor:
        m_star = self.m * self.w if self.use_similarity else self.m
        if self.sync and m_star.shape[0] > 1:
            order = m_star.argsort(dim=1)
            ranked = m_star.gather(1, order).mean(dim=0, keepdim=True)
            m_star = torch.empty_like(m_star).scatter(1, order, ranked.expand_as(m_star))
        return m_star

    def keep(self) -> torch.Tensor:
        m_star = self.weighted()
        hard = (m_star < self.tau).to(m_star.dtype)
        # every head keeps at least its best unit: a head (or group) is never emptied
        best = m_star.detach().argmin(dim=1, keepdim=True)
        hard = hard.scatter(1, best, 1.0)
        return hard + (m_star.detach() - m_star)  # value: hard; gradient to m*: -1

    def set_similarity(self, weight: torch.Tensor) -> None:
        with torch.no_grad():
            self.w.copy_(weight.reshape(self.w.shape))


class IndicatorGate(nn.Module):
    """Multiplies a tensor by its group's current keep mask (gate at a sink)."""

    def __init__(self, indicator: Indicator, unit_index: torch.Tensor):
        super().__init__()
        self.indicator = indicator
        self.register_buffer("unit_index", unit_index.long(), persistent=False)
        self.period = batch_period(self.unit_index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = fit_index(self.unit_index, self.period, x)
        return x * self.indicator.keep().reshape(-1)[index].to(x.dtype)
