"""What the memory benchmarks share: the residual MLP they train and the process's resident set size."""

from __future__ import annotations

import os

import torch
from torch import nn


def rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc/self/statm``), in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Residual(nn.Module):
    """``x + Linear(relu(x))``: one parameter-dominated residual block."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.lin(nn.functional.relu(x))
