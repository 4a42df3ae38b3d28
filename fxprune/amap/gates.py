"""Gate modules inserted by the ``insert-gates`` pass.

A :class:`ChannelGate` multiplies a tensor by one value per channel of a group, at the place
where a channel's contribution is contracted away (the input of the consuming Linear, or q in
a q.k product). Gate value 1 leaves the model bit-identical; value 0 equals removing the
channel.

Example:
    >>> import torch
    >>> gate = ChannelGate(group=0, num_heads=2, size=2, index=torch.tensor([[0, 1, 2, 3]]))
    >>> gate(torch.ones(1, 4)).tolist()
    [[1.0, 1.0, 1.0, 1.0]]
    >>> gate.set_mask(torch.tensor([[1, 0], [1, 1]], dtype=torch.bool))
    >>> gate(torch.ones(1, 4)).tolist()
    [[1.0, 0.0, 1.0, 1.0]]
"""

from __future__ import annotations

import torch
import torch.nn as nn


class GateValues(nn.Module):
    """The values of one group's gate, shape (num_heads, size); shared by all its sites."""

    def __init__(self, group: int, num_heads: int, size: int):
        super().__init__()
        self.group = group
        self.values = nn.Parameter(torch.ones(num_heads, size))

    def mask(self) -> torch.Tensor:
        return self.values.detach() > 0.5


def batch_period(index: torch.Tensor) -> int:
    """Smallest period of ``index`` along dim 0 (1 when it does not vary there). Heads folded
    into the batch dim (``B*h``) give an index that repeats every ``h`` entries; the gate then
    tiles that period to whatever batch size it sees."""
    n = index.shape[0] if index.ndim else 1
    for p in range(1, n + 1):
        if n % p == 0 and torch.equal(index, index[:p].repeat(n // p, *([1] * (index.ndim - 1)))):
            return p
    return n


def fit_index(index: torch.Tensor, period: int, x: torch.Tensor) -> torch.Tensor:
    """``index`` with its dim 0 tiled to ``x``'s when channels ride on a folded batch dim."""
    if index.ndim and index.shape[0] > 1 and index.shape[0] != x.shape[0]:
        base = index[:period]
        return base.repeat(x.shape[0] // period, *([1] * (index.ndim - 1)))
    return index


class ChannelGate(nn.Module):
    """``x * values.flatten()[index]``: ``index`` maps each channel position of ``x`` (shape
    broadcastable to ``x``) to its entry of the group's gate values."""

    def __init__(self, group: int, num_heads: int, size: int, index: torch.Tensor,
                 values: GateValues | None = None):
        super().__init__()
        self.group = group
        self.gate_values = values if values is not None else GateValues(group, num_heads, size)
        self.register_buffer("index", index.long(), persistent=False)
        self.period = batch_period(self.index)

    @property
    def values(self) -> nn.Parameter:
        return self.gate_values.values

    def set_mask(self, keep: torch.Tensor) -> None:
        with torch.no_grad():
            self.values.copy_(keep.to(self.values.dtype).reshape(self.values.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = fit_index(self.index, self.period, x)
        return x * self.values.reshape(-1)[index].to(x.dtype)
