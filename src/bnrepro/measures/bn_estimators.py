"""Which inference statistics should BN use? Every estimate, evaluated on the same weights.

`StatsEstimators` watches a network's BN layers through training and, at each evaluation,
tests the network with each estimate of every layer's inference mean and variance in turn:

- ``ema_<m>``: the exponential moving average of the batches' means and (unbiased)
  variances with momentum m, torch's rule (`trainer.bn_stats_probe.ema_momenta`).
- ``cumulative``: the plain average over every training batch seen (torch's momentum=None).
- ``algorithm2``: the paper's Algorithm 2: K fresh training batches through the trained
  network, mean of their means and m/(m-1) times the mean of their variances.
- ``precise``: "precise BN" (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm"): one pass
  over the whole training set in batches of the training size, in training mode (each layer
  sees what it saw in training), each channel's mean and variance over all those examples,
  the population estimate the others are compared with (with ghost batches too: the whole
  training set's statistics, whatever the groups a training step normalises over).

With `layer_errors`, each evaluation also records how far each estimate is from the precise
statistics in every BN layer (`layer_errors`): the mean error in units of the precise standard
deviation, |mu - mu_precise| / sigma_precise, and the standard deviation's log-ratio,
|log(sigma / sigma_precise)|, each averaged over the layer's channels (of one member).

The EMAs and the cumulative average are tracked by forward pre-hooks on the BN layers during
training steps only (`active`); the network's own buffers are never changed: each estimate
is copied in for its evaluation and the buffers are put back. Tracked estimates are not
checkpointed: a resumed run starts them over.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bnrepro.models.batchnorm import ghost_batch_stats, recompute_population_stats

Batches = Iterator[tuple[Tensor, Tensor]]
Stats = list[tuple[Tensor, Tensor]]  # per BN layer: (mean, variance), one entry per channel


def channel_view(layer: nn.Module, x: Tensor) -> Tensor:
    """The input as BN normalises it: channels in dim 1 (a StackedBatchNorm's (M, F, B) input
    is the (1, M*F, B) view its kernel sees)."""
    if hasattr(layer, "members"):
        return x.reshape(1, -1, x.shape[-1])
    return x


def batch_stats(layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The batch's per-channel mean and unbiased variance, as torch's BN averages them; for
    ghost batches (model.bn.ghost_batch) the groups' averages, which the layer's own running
    statistics average."""
    if getattr(layer, "ghost_batch", None) is not None:
        return ghost_batch_stats(layer, x)
    x = channel_view(layer, x)
    dims = [d for d in range(x.dim()) if d != 1]
    var, mean = torch.var_mean(x.detach(), dim=dims, correction=1)
    return mean, var


def estimator_names(ema_momenta: Sequence[float]) -> list[str]:
    """The estimates' names, in the order they are evaluated."""
    return [*(f"ema_{m:g}" for m in ema_momenta), "cumulative", "algorithm2", "precise"]


class StatsEstimators:
    """Estimates of every BN layer's inference statistics (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        ema_momenta: Sequence[float],
        population_batches: int,
        layer_errors: bool = False,
    ) -> None:
        self.model = model
        self.layer_errors = layer_errors
        self.layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
        self.momenta = list(ema_momenta)
        self.population_batches = population_batches
        self.active = True
        self.ema: list[Stats] = [self._initial() for _ in self.momenta]
        self.cumulative: Stats = self._initial()
        self.batches_seen = 0
        self._handles = [
            layer.register_forward_pre_hook(self._track(i)) for i, layer in enumerate(self.layers)
        ]

    def _initial(self) -> Stats:
        """torch's initial running statistics: mean 0, variance 1."""
        return [
            (torch.zeros_like(layer.running_mean), torch.ones_like(layer.running_var))
            for layer in self.layers
        ]

    def _track(self, index: int) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def hook(layer: nn.Module, args: tuple[Tensor, ...]) -> None:
            if not (self.active and layer.training):
                return
            mean, var = batch_stats(layer, args[0])
            for momentum, stats in zip(self.momenta, self.ema, strict=True):
                m, v = stats[index]
                m.lerp_(mean, momentum)
                v.lerp_(var, momentum)
            if index == 0:
                self.batches_seen += 1
            m, v = self.cumulative[index]
            weight = 1.0 / self.batches_seen
            m.lerp_(mean, weight)
            v.lerp_(var, weight)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No tracking within the block (evaluations, recomputations)."""
        was, self.active = self.active, False
        try:
            yield
        finally:
            self.active = was

    def current(self) -> Stats:
        """The layers' own running statistics, copied."""
        return [(layer.running_mean.clone(), layer.running_var.clone()) for layer in self.layers]

    @torch.no_grad()
    def load(self, stats: Stats) -> None:
        for layer, (mean, var) in zip(self.layers, stats, strict=True):
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)

    def algorithm2(self, batches: Batches) -> Stats:
        """Algorithm 2 over K batches (models/batchnorm.recompute_population_stats)."""
        recompute_population_stats(self.model, batches, self.population_batches)
        return self.current()

    @torch.no_grad()
    def precise(self, epoch: Iterable[tuple[Tensor, Tensor]]) -> Stats:
        """Each channel's mean and (biased) variance over every example of one training-mode
        pass over `epoch`, summed in float64."""
        sums = [None] * len(self.layers)

        def aggregate(index: int) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
            def hook(layer: nn.Module, args: tuple[Tensor, ...]) -> None:
                x = channel_view(layer, args[0]).double()
                dims = [d for d in range(x.dim()) if d != 1]
                part = (x.sum(dim=dims), (x * x).sum(dim=dims), x.numel() // x.shape[1])
                old = sums[index]
                if old is not None:
                    part = tuple(a + b for a, b in zip(old, part, strict=True))
                sums[index] = part

            return hook

        handles = [
            layer.register_forward_pre_hook(aggregate(i)) for i, layer in enumerate(self.layers)
        ]
        was_training = self.model.training
        self.model.train()
        saved = self.current()  # the passes update the running buffers; put them back
        try:
            for x, _ in epoch:
                self.model(x)
        finally:
            for handle in handles:
                handle.remove()
            self.load(saved)
            self.model.train(was_training)
        out = []
        for (s1, s2, n), layer in zip(sums, self.layers, strict=True):
            mean = s1 / n
            var = (s2 / n - mean * mean).clamp_min(0.0)
            out.append((mean.to(layer.running_mean.dtype), var.to(layer.running_var.dtype)))
        return out

    def evaluate(
        self,
        evaluate: Callable[[nn.Module], list[dict[str, float]]],
        population_batches: Batches,
        epoch: Iterable[tuple[Tensor, Tensor]],
    ) -> list[dict[str, float]]:
        """Test the network with each estimate; one record per member of the network,
        ``bn_stats/<estimate>/test_acc`` and ``.../test_loss``. The layers' buffers are left
        as they were."""
        with self.paused():
            own = self.current()
            estimates = {
                f"ema_{m:g}": stats for m, stats in zip(self.momenta, self.ema, strict=True)
            }
            estimates["cumulative"] = self.cumulative
            estimates["algorithm2"] = self.algorithm2(population_batches)
            estimates["precise"] = self.precise(epoch)
            records: list[dict[str, float]] | None = None
            try:
                for name, stats in estimates.items():
                    self.load(stats)
                    results = evaluate(self.model)
                    if records is None:
                        records = [{} for _ in results]
                    for record, result in zip(records, results, strict=True):
                        # test/acc -> bn_stats/<name>/test_acc (val/acc with a validation split)
                        for key, value in result.items():
                            record[f"bn_stats/{name}/{key.replace('/', '_')}"] = value
            finally:
                self.load(own)
            if records and self.layer_errors:
                errors = layer_errors(self, estimates, len(records))
                for record, layer_record in zip(records, errors, strict=True):
                    record.update(layer_record)
        return records or []


def layer_errors(
    estimators: StatsEstimators, estimates: dict[str, Stats], members: int
) -> list[dict[str, float]]:
    """Per member: every estimate's error against the precise statistics in each BN layer i
    (module order), ``bn_stats/<estimate>/mean_err/<i>`` = mean over channels of
    |mu - mu_p| / sqrt(var_p + eps) and ``.../std_err/<i>`` = mean over channels of
    |log(sqrt(var + eps) / sqrt(var_p + eps))|. A layer's channels are member-major (stacked
    networks: member m's block m of the M*C channels)."""
    precise = estimates["precise"]
    records: list[dict[str, float]] = [{} for _ in range(members)]
    for name, stats in estimates.items():
        if name == "precise":
            continue
        for i, ((mean, var), (p_mean, p_var), layer) in enumerate(
            zip(stats, precise, estimators.layers, strict=True)
        ):
            p_std = (p_var + layer.eps).sqrt()
            mean_err = ((mean - p_mean).abs() / p_std).chunk(members)
            std_err = ((var + layer.eps).sqrt() / p_std).log().abs().chunk(members)
            for record, m_err, s_err in zip(records, mean_err, std_err, strict=True):
                record[f"bn_stats/{name}/mean_err/{i:02d}"] = m_err.mean().item()
                record[f"bn_stats/{name}/std_err/{i:02d}"] = s_err.mean().item()
    return records
