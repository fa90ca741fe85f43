"""Built-in data with known statistics, for trying `batchprobe noise-scale` without a download.

Linear regression: x ~ N(0, I_d), y = w*.x + e with e ~ N(0, s^2). For the model y = w.x with the
mean squared error, the per-example gradient is g = 2 (w.x - y) x; with d = w - w*:

    G = E[g] = 2 d,  S = Cov[g] = 4 (|d|^2 + s^2) I + 4 d d^T   (Isserlis for Gaussian x)
    B_simple = tr(S) / |G|^2 = d (1 + s^2 / |d|^2) + 1

so the estimate can be checked against the exact value (`regression_noise_scale`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def target_weights(in_features: int, weight_seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(weight_seed)
    return torch.randn(in_features, generator=g) / in_features**0.5


def regression_batches(
    batch_size: int,
    device: torch.device | str = "cpu",
    in_features: int = 32,
    noise_std: float = 1.0,
    seed: int = 0,
    weight_seed: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """An endless stream of (x, y) batches of the regression problem."""
    w = target_weights(in_features, weight_seed)
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(batch_size, in_features, generator=g)
        y = x @ w + noise_std * torch.randn(batch_size, generator=g)
        yield x.to(device), y.to(device)


def regression_noise_scale(
    weights: torch.Tensor, noise_std: float = 1.0, weight_seed: int = 1
) -> float:
    """The exact B_simple at model weights `weights` (shape [d] or [1, d])."""
    w = weights.detach().reshape(-1).float().cpu()
    d = w.numel()
    delta_sq = float((w - target_weights(d, weight_seed)).pow(2).sum())
    return d * (1 + noise_std**2 / delta_sq) + 1
