"""Shuffled mini-batches drawn from tensors held in memory (no DataLoader: 3-4x faster here)."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def shuffled_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless epochs; each a fresh permutation, the last incomplete batch dropped.

    Dropping it keeps every batch at the paper's m, which Algorithm 2's m/(m-1) assumes.
    """
    n_batches = x.shape[0] // batch_size
    while True:
        order = torch.randperm(x.shape[0], generator=generator)
        for i in range(n_batches):
            idx = order[i * batch_size : (i + 1) * batch_size]
            yield x[idx], y[idx]
