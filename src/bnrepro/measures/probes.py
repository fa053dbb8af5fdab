"""Percentiles of the input to a nonlinearity (Figure 1 b, c), read with forward hooks.

The input, not the output: two public reproductions plotted the sigmoid's output by mistake.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn


def unit_values(x: torch.Tensor, unit: int, members: int | None) -> torch.Tensor:
    """The values of one unit as (members, n): a stacked model's feature-major (M, F, B) input
    gives one row per member, as does a stacked conv net's (B, M*C, H, W) input (member m's
    maps in channel block m); a plain (B, F) or (B, C, H, W) input gives one row (for a
    convolution, every position of feature map `unit` counts, as BN's statistics do)."""
    if members is not None and x.dim() == 4:
        return x.unflatten(1, (members, -1))[:, :, unit].transpose(0, 1).reshape(members, -1)
    if members is not None:
        return x[:, unit]
    return x[:, unit].reshape(1, -1)


@torch.inference_mode()
def nonlinearity_input_percentiles(
    model: nn.Module,
    nonlinearities: Mapping[str, nn.Module],
    probe_x: torch.Tensor,
    unit: int,
    percentiles: Sequence[float],
) -> list[dict[str, float]]:
    """Run `probe_x` through `model` in inference mode; for each member of the model (one for a
    plain network), return {"act/<layer>/p<q>": value}.

    For each named nonlinearity, the values of unit `unit` of its input over the probe set
    are reduced to the given percentiles (linear interpolation, as numpy.percentile).
    """
    members = getattr(model, "members", None)
    captured: dict[str, torch.Tensor] = {}

    def capture(name: str):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            captured[name] = unit_values(args[0], unit, members).detach().double()

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

    out: list[dict[str, float]] = [{} for _ in range(members or 1)]
    if not captured:
        return out
    names = list(captured)
    q = torch.tensor([p / 100.0 for p in percentiles], dtype=torch.float64, device=probe_x.device)
    # Every layer's quantiles on the device, then one transfer: one host sync per evaluation.
    tables = torch.stack([torch.quantile(captured[n], q, dim=1).T for n in names]).tolist()
    for name, table in zip(names, tables, strict=True):  # table: (members, len(q))
        for record, row in zip(out, table, strict=True):
            for p, v in zip(percentiles, row, strict=True):
                record[f"act/{name}/p{p:g}"] = v
    return out
