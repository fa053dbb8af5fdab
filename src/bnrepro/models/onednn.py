"""fp32 matrix products through oneDNN on CPU, for the stacked MLP's large products.

torch's fp32 CPU matmul calls MKL's sgemm, which on AMD CPUs runs its AVX2 kernels; oneDNN
(the library torch's inductor backend calls for linear layers) picks its kernels from the
CPU's features. On the AMD EPYC (AVX-512) machine this suite is benchmarked on, one member's
first-layer products ran at 164 against 99 GFLOP/s (forward, 60x784 @ 784x100) and 194
against 110 (weight gradient), one thread each. Both are plain fp32 products; they differ
only in the order of their sums.

torch exposes oneDNN's fp32 matmul only as the inductor op `mkldnn::_linear_pointwise`, which
has no autograd formula and does not check its arguments, so it is reached only through
`mm` (2-D float32 CPU tensors, checked) and `MemberMatmuls` (autograd).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Each call costs ~10 us more than MKL's batched gemm; below about a million multiply-adds
# per member that outweighs oneDNN's faster kernel (the MLP's 100x100 layers at batch 60).
MIN_MACS = 1 << 20


BUILT_WITH_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(
    torch.ops.mkldnn, "_linear_pointwise"
)


def available(*tensors: Tensor) -> bool:
    """Whether `mm` can multiply these: float32 CPU tensors and a torch built with oneDNN."""
    return BUILT_WITH_ONEDNN and all(
        t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors
    )


def worth_it(rows: int, inner: int, cols: int) -> bool:
    """Whether a (rows, inner) @ (inner, cols) product is large enough for a oneDNN call."""
    return rows * inner * cols >= MIN_MACS


def mm(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for 2-D float32 CPU tensors of any strides, computed by oneDNN (no autograd)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] or not available(a, b):
        raise ValueError(f"onednn.mm needs 2-D float32 CPU tensors, got {a.shape} @ {b.shape}")
    return _mm(a, b)


def _mm(a: Tensor, b: Tensor) -> Tensor:
    # _linear_pointwise(x, w) is x @ w.T, as F.linear. Unchecked: the op reads out of bounds
    # on wrong shapes, so callers check first (MemberMatmuls checks once per stack).
    return torch.ops.mkldnn._linear_pointwise(a, b.T, None, "none", [], "")


class MemberMatmuls(torch.autograd.Function):
    """out[i] = weights[i] @ h[i] for each member i: (out, in) @ (M, in, B) -> (M, out, B),
    one oneDNN product per member (oneDNN has no batched fp32 matmul that torch exposes).

    `MemberMatmuls.apply(h, *weights)`; each weight gets its own gradient, no stacked copy.
    """

    @staticmethod
    def forward(ctx, h: Tensor, *weights: Tensor) -> Tensor:  # noqa: D102
        out, inner = weights[0].shape
        if (
            h.dim() != 3
            or h.shape[:2] != (len(weights), inner)
            or any(w.shape != (out, inner) for w in weights)
            or not available(h, *weights)
        ):
            raise ValueError(
                f"MemberMatmuls needs float32 CPU M x (out, in) @ (M, in, B), got "
                f"{len(weights)} x {tuple(weights[0].shape)} @ {tuple(h.shape)}"
            )
        ctx.save_for_backward(h, *weights)
        return torch.stack([_mm(w, x) for w, x in zip(weights, h, strict=True)])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: D102
        h, *weights = ctx.saved_tensors
        grad_h = None
        if ctx.needs_input_grad[0]:
            grad_h = torch.stack([_mm(w.T, g) for w, g in zip(weights, grad, strict=True)])
        grad_weights = [
            _mm(g, x.T) if needed else None
            for g, x, needed in zip(grad, h, ctx.needs_input_grad[1:], strict=True)
        ]
        return grad_h, *grad_weights
