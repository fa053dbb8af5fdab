"""Speed tricks kept out of the reproduction's core: each is opt-in, changes no result beyond
the order of float sums, and its docstring gives its measured effect.

- `mkl_vendor`: MKL's AVX-512 kernels on AMD CPUs (`trainer.mkl_skip_vendor_check=true`).
"""
