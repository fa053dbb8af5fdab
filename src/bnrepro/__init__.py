"""bnrepro: a reference reproduction of Ioffe & Szegedy, Batch Normalization (ICML 2015)."""

__version__ = "0.1.0"

import atexit as _atexit
import gc as _gc

# Python's last garbage collection at exit walks every object that torch, torchvision and
# W&B created (1.2 s per process here, paid again by every launcher worker). Jobs close
# their files and runs themselves, so exit skips it by freezing what is left.
_atexit.register(_gc.freeze)
