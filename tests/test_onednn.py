"""oneDNN's fp32 products (the stacked MLP's first layer) compute what torch.matmul computes."""

from __future__ import annotations

import pytest
import torch

from bnrepro.models import onednn

pytestmark = pytest.mark.skipif(not onednn.BUILT_WITH_ONEDNN, reason="torch without oneDNN")


def reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() @ b.double()).float()


@pytest.mark.parametrize("a_t", [False, True])
@pytest.mark.parametrize("b_t", [False, True])
def test_mm_matches_float64_for_every_layout(a_t, b_t):
    # Every stride pattern the stacked MLP passes: transposed views of activations, weights
    # and gradients.
    a = torch.randn(90, 70).T if a_t else torch.randn(70, 90)
    b = torch.randn(60, 90).T if b_t else torch.randn(90, 60)
    torch.testing.assert_close(onednn.mm(a, b), reference(a, b), atol=1e-4, rtol=1e-5)


def test_member_matmuls_forward_and_gradients_match_autograd_of_bmm():
    members = 3
    weights = [torch.randn(40, 300, requires_grad=True) for _ in range(members)]
    x = torch.randn(members, 50, 300, requires_grad=True)
    grad_out = torch.randn(members, 40, 50)

    out = onednn.MemberMatmuls.apply(x.transpose(1, 2), *weights)  # (M, 40, 50)
    out.backward(grad_out)
    got = [out.detach(), x.grad.clone(), *(w.grad.clone() for w in weights)]

    x.grad = None
    for w in weights:
        w.grad = None
    expected = torch.bmm(torch.stack(weights), x.transpose(1, 2))
    expected.backward(grad_out)
    want = [expected.detach(), x.grad, *(w.grad for w in weights)]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-5)


def test_member_matmuls_skip_gradients_nobody_needs():
    weights = [torch.randn(8, 16, requires_grad=True) for _ in range(2)]
    x = torch.randn(2, 16, 4)  # data: no gradient wanted
    onednn.MemberMatmuls.apply(x, *weights).sum().backward()
    assert x.grad is None and all(w.grad is not None for w in weights)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (torch.randn(3, 4), torch.randn(5, 6)),  # inner sizes differ
        (torch.randn(2, 3, 4), torch.randn(4, 5)),  # not 2-D
        (torch.randn(3, 4).double(), torch.randn(4, 5).double()),  # not float32
    ],
)
def test_mm_refuses_what_the_raw_op_would_misread(a, b):
    # The raw op does not check its arguments (a 3-D weight crashed the process).
    with pytest.raises(ValueError, match="onednn.mm needs"):
        onednn.mm(a, b)


def test_member_matmuls_refuse_mismatched_members():
    weights = [torch.randn(8, 16) for _ in range(3)]
    with pytest.raises(ValueError, match="MemberMatmuls needs"):
        onednn.MemberMatmuls.apply(torch.randn(2, 16, 4), *weights)
