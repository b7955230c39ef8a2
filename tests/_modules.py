"""Small modules shared by several test files."""

from __future__ import annotations

import torch
import torch.nn as nn


class Block(nn.Module):
    """One linear and a ReLU, in a module of our own (Dynamo traces it where a bare nn.Linear compiled
    with Module.compile() is not)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(128, 128)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))
