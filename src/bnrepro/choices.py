"""The values a config may choose from, kept free of torch: the launching process checks a
command line against them before any job starts, without paying for torch's import."""

from __future__ import annotations

ACTIVATION_NAMES = ("sigmoid", "relu")
NORMS = ("none", "bn")
STATS_MODES = ("ema", "cumulative", "population")  # BN inference statistics (batchnorm.py)
DEVICES = ("auto", "cpu", "cuda")
DIST_BN_MODES = ("reduce", "broadcast")  # BN running statistics across ranks (distributed.py)
# Where ImageNet training JPEGs are decoded and augmented: PIL in the DataLoader workers, or the
# run's device on whole batches (the workers only read bytes); auto = device on CUDA.
DECODE_MODES = ("auto", "workers", "device")
