"""Internal covariate shift and the loss landscape along the gradient, measured as Santurkar,
Tsipras, Ilyas & Madry (2018, "How Does Batch Normalization Help Optimization?") define them.

`measured_step` is one training step of the MLP (plain or stacked) that also measures, on that
step's mini-batch, with the weights theta before the step and its gradient g:

- ICS of each layer k after the first (their Definition 2.1): the gradient G_k of the loss
  with respect to layer k's weight matrix, and G'_k, the same gradient after the layers before
  k have taken this step's update (layers k.. unchanged): ``ics/<layer>/l2`` = ||G_k - G'_k||
  and ``ics/<layer>/cos`` = cos(G_k, G'_k). A layer whose inputs did not move has l2 = 0 and
  cos = 1.
- the landscape along g (their Section 3.2, Figure 4, Appendix A.2.2), at step sizes
  eta = lr * step_scales: ``landscape/loss_range``, max - min of L(theta - eta g) over the
  step sizes and eta = 0 ("variation of the loss"); ``landscape/grad_change``, max over eta of
  ||grad L(theta - eta g) - g|| ("gradient predictiveness": small is predictive);
  ``landscape/grad_change_rel``, that change over ||g|| (scale-free: BN's gradients are
  larger, which inflates the unnormalised change); ``landscape/beta``, max over eta of the
  change divided by the distance moved ||eta g||, the effective beta-smoothness (scale-free
  too); and ``landscape/loss``, the batch loss at theta, to compare arms at matched loss.

Every loss is the training loss on the same batch in training mode (BN with the batch's
statistics); noisy BN's noise is drawn once and held for all of them. The step itself is the
optimizer's ordinary step with g, and BN's running statistics end as the ordinary step leaves
them: measuring does not change the run. A stacked model's members are measured separately
(each member's loss depends on its own weights only), one record per member.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from bnrepro.models.norms import held_noise

LossFn = Callable[[Tensor, Tensor], Tensor]  # (logits, targets) -> per-member losses (M,)


def layer_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Each layer's parameters in forward order: hidden blocks h1..hN (linear and norm), then
    the classifier. The first parameter of each is the layer's weight matrix."""
    layers = {name: list(block.parameters()) for name, block in model.layers.items()}
    layers["classifier"] = list(model.classifier.parameters())
    return layers


def per_member(tensors: Sequence[Tensor], members: int) -> Tensor:
    """The tensors flattened and joined per member: (members, n). Stacked parameters are
    member-major (StackedLinear's (M, out, in), the stacked norms' (M * F,)), so a reshape to
    (M, -1) gives each member its own row; a plain network is one member."""
    return torch.cat([t.reshape(members, -1) for t in tensors], dim=1)


def _norm(v: Tensor) -> Tensor:
    return v.double().norm(dim=1)


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    a, b = a.double(), b.double()
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)


@torch.no_grad()
def _assign(params: Sequence[nn.Parameter], values: Sequence[Tensor]) -> None:
    for p, v in zip(params, values, strict=True):
        p.copy_(v)


def measured_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    step_scales: Sequence[float],
    loss_fn: LossFn,
) -> tuple[Tensor, list[dict[str, float]]]:
    """One training step on (x, y) with the measurements above; returns the detached losses
    per member (as `loop.train_step`) and one record per member."""
    members = getattr(model, "members", 1)
    layers = layer_parameters(model)
    params = [p for group in layers.values() for p in group]
    lr = optimizer.param_groups[0]["lr"]
    model.train()

    def loss_and_grads(wanted: Sequence[nn.Parameter]) -> tuple[Tensor, tuple[Tensor, ...]]:
        losses = loss_fn(model(x), y)
        return losses.detach(), torch.autograd.grad(losses.sum(), list(wanted))

    with held_noise(model):
        before = [p.detach().clone() for p in params]
        losses, grads = loss_and_grads(params)
        # The ordinary step's effect on BN's running statistics; later passes are restored away.
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        g = per_member(grads, members)
        g_norm = _norm(g)

        # The landscape along -g.
        loss_values = [losses.double()]
        changes, betas = [], []
        for scale in step_scales:
            eta = lr * scale
            _assign(params, [p - eta * d for p, d in zip(before, grads, strict=True)])
            moved_losses, moved = loss_and_grads(params)
            loss_values.append(moved_losses.double())
            change = _norm(per_member(moved, members) - g)
            changes.append(change)
            betas.append(change / (eta * g_norm).clamp_min(1e-300))
        loss_table = torch.stack(loss_values)
        records = {
            "landscape/loss_range": loss_table.max(dim=0).values - loss_table.min(dim=0).values,
            "landscape/grad_change": torch.stack(changes).max(dim=0).values,
            "landscape/grad_change_rel": torch.stack(changes).max(dim=0).values
            / g_norm.clamp_min(1e-300),
            "landscape/beta": torch.stack(betas).max(dim=0).values,
            "landscape/grad_norm": g_norm,
            "landscape/loss": losses.double(),
        }

        # The step itself: the optimizer's, with g.
        _assign(params, before)
        optimizer.zero_grad(set_to_none=True)
        for p, d in zip(params, grads, strict=True):
            p.grad = d.clone()
        optimizer.step()
        after = [p.detach().clone() for p in params]

        # ICS: layer k's weight gradient once the layers before k have stepped.
        names = list(layers)
        first = len(layers[names[0]])  # parameters before this index belong to earlier layers
        for name in names[1:]:
            _assign(params, [*after[:first], *before[first:]])
            weight = layers[name][0]
            _, (shifted,) = loss_and_grads([weight])
            original = grads[first].reshape(members, -1)
            shifted = shifted.reshape(members, -1)
            records[f"ics/{name}/l2"] = _norm(original - shifted)
            records[f"ics/{name}/cos"] = _cosine(original, shifted)
            first += len(layers[name])

        _assign(params, after)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    table = {key: value.tolist() for key, value in records.items()}
    per = [{key: values[i] for key, values in table.items()} for i in range(members)]
    return losses, per
