"""The small building blocks the fusions share (the bottom floor: imports torch only)."""
from __future__ import annotations

import torch
import torch.nn as nn


class MLP(nn.Module):
    """fc2(GELU(fc1(x))), exact (erf) GELU: x [..., d_in] -> [..., d_out] in the parameters' dtype."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))
