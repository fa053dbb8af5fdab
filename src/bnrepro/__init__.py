"""bnrepro: a reference reproduction of Ioffe & Szegedy, Batch Normalization (ICML 2015)."""

__version__ = "0.1.0"
