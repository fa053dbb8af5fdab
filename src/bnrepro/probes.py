"""Percentiles of the input to a nonlinearity (Figure 1 b, c), read with forward hooks.

The input, not the output: two public reproductions plotted the sigmoid's output by mistake.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn


@torch.inference_mode()
def nonlinearity_input_percentiles(
    model: nn.Module,
    nonlinearities: Mapping[str, nn.Module],
    probe_x: torch.Tensor,
    unit: int,
    percentiles: Sequence[float],
) -> dict[str, float]:
    """Run `probe_x` through `model` in inference mode; return {"act/<layer>/p<q>": value}.

    For each named nonlinearity, the values of unit `unit` of its input over the probe set
    are reduced to the given percentiles (linear interpolation, as numpy.percentile).
    """
    captured: dict[str, torch.Tensor] = {}

    def capture(name: str):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            captured[name] = args[0][:, unit].detach().double()

        return hook

    handles = [m.register_forward_pre_hook(capture(n)) for n, m in nonlinearities.items()]
    was_training = model.training
    try:
        model.eval()
        model(probe_x)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()

    q = torch.tensor([p / 100.0 for p in percentiles], dtype=torch.float64)
    out: dict[str, float] = {}
    for name, values in captured.items():
        for p, v in zip(percentiles, torch.quantile(values, q).tolist(), strict=True):
            out[f"act/{name}/p{p:g}"] = v
    return out
