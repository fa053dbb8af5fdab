"""The training step captured in a CUDA graph (`trainer.cuda_graph`): one launch per step.

The Figure-1 MLP is tiny: on a GPU an eager step is some fifty small kernels whose launches
cost far more than they run, and the GPU idles most of each step. A CUDA graph replays the
whole step with one launch. The recipe is torch's "whole network capture" (the
torch.cuda.graphs notes): warm-up steps on a side stream, then one step captured with static
input buffers; every later step copies its batch into those buffers and replays the graph.
The warm-up steps are real training steps and capturing executes nothing, so the run trains on
the same batches in the same order as the eager loop.

What is captured is fixed: forward, loss, backward and the optimizer step, with the learning
rate as a number inside the graph. So it needs a constant learning rate, a single process
(no DDP collectives), BN layers that do not read their momentum from the host (EMA and
population modes; `cumulative` reads `num_batches_tracked`) and no other thread calling CUDA
while it captures (ImageNet's DataLoader pins batches in one). `bnrepro.training.run` checks
these.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

StepFn = Callable[[Tensor, Tensor], Tensor]


class GraphStep:
    """Call like the step function it wraps: (x, y) -> detached per-member losses.

    The returned tensor is the graph's static output: read or copy it before the next call.
    """

    def __init__(self, step: StepFn, warmup_steps: int = 3) -> None:
        self.step, self.warmup_steps = step, warmup_steps
        self.warmed = 0
        # One side stream, made at the first call, for every warm-up step and the capture (the
        # notes' recipe passes the warm-up's stream to torch.cuda.graph too).
        self.side: torch.cuda.Stream | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_x: Tensor | None = None
        self.static_y: Tensor | None = None
        self.static_losses: Tensor | None = None

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        if self.graph is None and self.warmed < self.warmup_steps:
            # Warm-up on a side stream (cuBLAS handles, autograd's streams, the optimizer's
            # lazy state are made here, outside the capture), as the capture notes require.
            side = self.side_stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                losses = self.step(x, y)
            torch.cuda.current_stream().wait_stream(side)
            self.warmed += 1
            return losses
        if self.graph is None:
            self.static_x, self.static_y = x.clone(), y.clone()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=self.side_stream()):
                self.static_losses = self.step(self.static_x, self.static_y)
        else:
            self.static_x.copy_(x, non_blocking=True)
            self.static_y.copy_(y, non_blocking=True)
        self.graph.replay()
        return self.static_losses

    def side_stream(self) -> torch.cuda.Stream:
        """The side stream of the warm-up and the capture, the same one every time."""
        if self.side is None:
            self.side = torch.cuda.Stream()
        return self.side
