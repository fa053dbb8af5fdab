"""Shuffled mini-batches drawn from tensors held in memory (no DataLoader: 3-4x faster here).

One iterator serves a plain model, (B, ...) batches, and a stacked one, (M, B, ...) batches
with member i drawing exactly the batches its own seed draws on the plain path. It can save
and restore its position, so an interrupted run resumes with the same data order.
"""

from __future__ import annotations

from typing import Any

import torch

from bnrepro.data.transfer import to_device


class ShuffledBatches:
    """Endless epochs; each a fresh permutation per generator, the last incomplete batch
    dropped (it keeps every batch at the paper's m, which Algorithm 2's m/(m-1) assumes).

    Images stored as uint8 (4x less memory) are scaled to [0, 1] floats batch by batch, which
    gives the same floats as scaling the whole dataset first.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        generators: list[torch.Generator],
        stacked: bool,
    ) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self.generators, self.stacked = generators, stacked
        self.n_batches = x.shape[0] // batch_size
        self.position = self.n_batches  # start a new epoch at the first next()
        self.epoch_states: list[torch.Tensor] = []

    def _new_epoch(self) -> None:
        self.epoch_states = [g.get_state() for g in self.generators]
        orders = torch.stack(
            [torch.randperm(self.x.shape[0], generator=g) for g in self.generators]
        )
        # (batches, members, batch_size), contiguous: one index_select per step (3x faster
        # than advanced indexing with a 2-d index).
        cut = orders[:, : self.n_batches * self.batch_size]
        self.steps = cut.view(len(self.generators), self.n_batches, self.batch_size)
        # CPU generators on every device (a seed means the same order on CPU and GPU); the
        # epoch's indices then move to the data's device once, not once per step, and without
        # a host sync (to_device: a pinned, asynchronous copy on a GPU).
        self.steps = to_device(self.steps.transpose(0, 1).contiguous(), self.x.device)
        self.position = 0

    def __iter__(self) -> ShuffledBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position == self.n_batches:
            self._new_epoch()
        flat = self.steps[self.position].view(-1)
        self.position += 1
        x, y = self.x.index_select(0, flat), self.y.index_select(0, flat)
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        if self.stacked:
            return x.view(len(self.generators), self.batch_size, *x.shape[1:]), y.view(
                len(self.generators), self.batch_size
            )
        return x, y

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_states": self.epoch_states, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replay the saved epoch's permutation and continue after its last batch served."""
        if state["epoch_states"]:
            for g, s in zip(self.generators, state["epoch_states"], strict=True):
                g.set_state(s)
            self._new_epoch()
        self.position = state["position"]


def shuffled_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator
) -> ShuffledBatches:
    """(B, ...) batches for one model."""
    return ShuffledBatches(x, y, batch_size, [generator], stacked=False)


def stacked_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generators: list[torch.Generator]
) -> ShuffledBatches:
    """(M, B, ...) batches for stacked models: member i draws exactly the batches that
    `shuffled_batches(x, y, batch_size, generators[i])` would."""
    return ShuffledBatches(x, y, batch_size, generators, stacked=True)
