"""Datasets, kept as in-memory tensors."""
