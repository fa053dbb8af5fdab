"""The values a config may choose from, kept free of torch: the launching process checks a
command line against them before any job starts, without paying for torch's import."""

from __future__ import annotations

ACTIVATION_NAMES = ("sigmoid", "relu")
NORMS = ("none", "bn")
STATS_MODES = ("ema", "cumulative", "population")  # BN inference statistics (batchnorm.py)
DEVICES = ("auto", "cpu", "cuda")
