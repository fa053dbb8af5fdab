"""When a run has stopped improving: the plateau rule of `trainer.plateau`.

A curve has plateaued at its last evaluation (step s, at least `min_steps`) when its best
accuracy so far exceeds its best up to step (1 - window) * s by less than `min_gain` points:
over the last quarter of its steps (window 0.25) the run gained less than, say, 0.2 points.
The best, not the last, accuracy, so one noisy evaluation neither starts nor stops a plateau.
"""

from __future__ import annotations

from collections.abc import Sequence

from bnrepro.config.schema import PlateauConfig


def plateaued(points: Sequence[tuple[int, float]], rule: PlateauConfig) -> bool:
    """Whether the curve `points` ((step, accuracy), in step order) has plateaued at its last
    point by `rule`."""
    if not points or points[-1][0] < rule.min_steps:
        return False
    cut = (1 - rule.window) * points[-1][0]
    before = [acc for step, acc in points if step <= cut]
    if not before:
        return False
    return max(acc for _, acc in points) - max(before) < rule.min_gain
