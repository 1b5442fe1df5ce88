"""Small models and calibration data shared by the compression tests."""

from __future__ import annotations

import torch
from torch import nn


def mlp(seed: int = 0, width: int = 48) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, width), nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 16))


def correlated_batches(seed: int = 1, n: int = 8, dim: int = 24) -> list[torch.Tensor]:
    """Inputs with a strongly non-isotropic covariance, so whitening matters."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) * torch.logspace(0, -2, dim).unsqueeze(0)
    return [torch.randn(32, dim, generator=g) @ mix.T for _ in range(n)]


def cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1, dilation=2), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 5 * 5, 10),
    )



class DeadBranch(nn.Module):
    """``dead``'s output reaches the model's output multiplied by zero: the output does not depend on it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.dead, self.b = nn.Linear(24, 48), nn.Linear(48, 48), nn.Linear(48, 16)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.a(x))
        return self.b(h + 0.0 * self.dead(h))


VOCAB = 100


def token_ids(*shape: int, seed: int = 0) -> torch.Tensor:
    """Random token ids below :data:`VOCAB`, shape ``shape``."""
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def token_batches(n: int = 4, batch: int = 2, length: int = 16, seed: int = 1) -> list[torch.Tensor]:
    """``n`` batches of ``batch`` random windows of ``length`` tokens."""
    return list(token_ids(n * batch, length, seed=seed).split(batch))
