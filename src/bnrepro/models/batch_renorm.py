"""Batch Renormalization (Ioffe 2017), Algorithm 1, for inputs of shape (N, C, *).

Statistics are per channel (dim 1) over every other dim, as in nn.BatchNorm1d/2d. Training,
for a mini-batch B with moving averages mu, sigma:

    mu_B    = mean(x)
    sigma_B = sqrt(mean((x - mu_B)^2) + eps)
    r       = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
    d       = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
    x_hat   = (x - mu_B) / sigma_B * r + d
    y       = gamma * x_hat + beta
    mu     += momentum * (mu_B - mu);   sigma += momentum * (sigma_B - sigma)

Inference: y = gamma * (x - mu) / sigma + beta, the same affine map that r and d make the
training output equal to whenever they are not clipped. With r_max = 1 and d_max = 0 this is
plain BN; the paper keeps it so for the first 5000 steps, then relaxes the limits to reach
r_max = 3 at 40k steps and d_max = 5 at 25k steps (linearly, in our reading of "gradually").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bnrepro.models.batchnorm import from_ghost_layout, group_average, to_ghost_layout


class BatchRenorm(nn.Module):
    """Batch renormalization over channel dim 1 of (N, C, *) inputs (Algorithm 1).

    `r_max` and `d_max` are the final clipping limits; they are 1 and 0 (plain BN) until
    `warmup_steps` training batches have been seen, then grow linearly to reach `r_max` at
    batch `r_max_steps` and `d_max` at batch `d_max_steps`. `momentum` is the update rate of
    the moving mean and standard deviation.
    """

    def __init__(
        self,
        num_features: int,
        *,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        r_max_steps: int = 40000,
        d_max_steps: int = 25000,
        momentum: float = 0.01,
        eps: float = 1e-5,
        ghost_batch: int | None = None,
    ) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features must be positive, got {num_features}")
        if r_max < 1.0 or d_max < 0.0:
            raise ValueError(f"need r_max >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}")
        if min(warmup_steps, r_max_steps, d_max_steps) < 0:
            raise ValueError("warmup_steps, r_max_steps and d_max_steps must be >= 0")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        if eps <= 0.0:
            raise ValueError(f"eps must be positive, got {eps}")
        if ghost_batch is not None and ghost_batch < 2:
            raise ValueError(f"ghost_batch must be None or >= 2, got {ghost_batch}")
        self.ghost_batch = ghost_batch
        self.num_features = num_features
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.warmup_steps = warmup_steps
        self.r_max_steps, self.d_max_steps = r_max_steps, d_max_steps
        self.momentum, self.eps = float(momentum), float(eps)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_std", torch.ones(num_features))
        # In the state dict, so that a resumed run continues the r_max / d_max schedule.
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self) -> None:
        """Forget the moving averages and restart the schedule."""
        self.running_mean.zero_()
        self.running_std.fill_(1.0)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Running statistics as new, gamma = 1, beta = 0."""
        self.reset_running_stats()
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def limits(self) -> tuple[Tensor, Tensor]:
        """The current (r_max, d_max), 0-dim tensors on the buffers' device.

        Computed from `num_batches_tracked` without reading it on the host, so a training step
        costs no device sync and stays capturable by CUDA graphs / torch.compile.
        """
        # Counts up to 2^24 are exact in float32; the ramps end long before that in practice.
        t = self.num_batches_tracked.to(self.running_std.dtype)
        r_max_t = self._ramp(t, 1.0, self.r_max, self.r_max_steps)
        d_max_t = self._ramp(t, 0.0, self.d_max, self.d_max_steps)
        return r_max_t, d_max_t

    def _ramp(self, t: Tensor, start: float, end: float, end_step: int) -> Tensor:
        """`start` before the warmup ends, then linear to `end` at `end_step`, then `end`."""
        if end_step > self.warmup_steps:
            fraction = ((t - self.warmup_steps) / (end_step - self.warmup_steps)).clamp(0.0, 1.0)
        else:  # no room for a ramp: jump straight to the final limit once warmup is over
            fraction = (t >= self.warmup_steps).to(t.dtype)
        return start + (end - start) * fraction

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"expected input of shape (N, {self.num_features}, *), got {tuple(x.shape)}"
            )
        if not self.training:
            # gamma * (x - mu) / sigma + beta: torch's BN kernel in evaluation mode, with
            # variance sigma^2 and eps 0 (sigma already holds the eps of training).
            var = self.running_std.square()
            return F.batch_norm(x, self.running_mean, var, self.weight, self.bias, False, 0.0, 0.0)

        if x.numel() == x.shape[1]:
            raise ValueError(
                f"expected more than 1 value per channel when training, got input size "
                f"{tuple(x.shape)}"
            )
        # Ghost batches as channels (models/batchnorm.py's layout, GhostBatchNorm's): channel
        # c*n + k of (g, C*n, *) is channel c of group k; n = 1 without ghosts.
        grouped, groups = x, 1
        if self.ghost_batch is not None:
            grouped, groups = to_ghost_layout(x, self.ghost_batch)
        dims = [d for d in range(grouped.dim()) if d != 1]

        # The limits of this step come from the batches seen before it (the count is bumped
        # below). r and d are constants for backprop (the paper's stop_gradient): gradients flow
        # through mu_B and sigma_B as in BN, and r, d only correct the output towards the
        # moving averages. So the output is BN's with gamma * r for gamma and gamma * d + beta
        # for beta: torch's BN kernel computes it, forward and backward, in one pass each
        # instead of an autograd graph of six elementwise ops (same values to rounding; tests/
        # test_batch_renorm.py checks them against Algorithm 1 in NumPy).
        r_max_t, d_max_t = self.limits()
        with torch.no_grad():
            var_b, mu_b = torch.var_mean(grouped, dim=dims, correction=0)  # Alg. 1: biased
            sigma_b = torch.sqrt(var_b + self.eps)
            running_mean = self.running_mean.repeat_interleave(groups)
            running_std = self.running_std.repeat_interleave(groups)
            r = (sigma_b / running_std).clamp(1.0 / r_max_t, r_max_t)
            d = ((mu_b - running_mean) / running_std).clamp(-d_max_t, d_max_t)
        gamma = self.weight.repeat_interleave(groups)
        beta = self.bias.repeat_interleave(groups)
        y = F.batch_norm(grouped, None, None, gamma * r, gamma * d + beta, True, 0.0, self.eps)
        if self.ghost_batch is not None:
            y = from_ghost_layout(y, x, groups)

        with torch.no_grad():
            # The paper averages sigma_B itself, not the variance (inference divides by it);
            # with ghost batches, over the groups.
            mu_b, sigma_b = group_average(mu_b, groups), group_average(sigma_b, groups)
            self.running_mean.add_(self.momentum * (mu_b - self.running_mean))
            self.running_std.add_(self.momentum * (sigma_b - self.running_std))
            self.num_batches_tracked.add_(1)
        return y

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, r_max={self.r_max}, d_max={self.d_max}, "
            f"warmup_steps={self.warmup_steps}, r_max_steps={self.r_max_steps}, "
            f"d_max_steps={self.d_max_steps}, momentum={self.momentum}, eps={self.eps}, "
            f"ghost_batch={self.ghost_batch}"
        )


class StackedBatchRenorm(BatchRenorm):
    """Batch renorm per member and feature of (M, F, B) activations, as channels of a
    (1, M*F, B) view.

    Channels are member-major: member i's features are channels i*F .. (i+1)*F - 1, so member
    i computes exactly what a BatchRenorm(F) with those slices computes on its (B, F) batch.
    """

    def __init__(self, members: int, features: int, **settings: Any) -> None:
        super().__init__(members * features, **settings)
        self.members, self.features = members, features

    def forward(self, h: Tensor) -> Tensor:
        if self.ghost_batch is None or not self.training:
            return super().forward(h.reshape(1, -1, h.shape[-1])).view_as(h)
        # Ghost batches split the examples: (B, M*F) rows, grouped along B.
        rows = h.permute(2, 0, 1).reshape(h.shape[-1], -1)
        return super().forward(rows).view(h.shape[-1], *h.shape[:2]).permute(1, 2, 0)

    def extra_repr(self) -> str:
        return f"members={self.members}, features={self.features}, " + super().extra_repr()
