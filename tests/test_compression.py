import pytest
import torch

import reference64 as ref
from ibnorm import compress
from ibnorm.compression import COMPRESSION_OPS

OPS = list(COMPRESSION_OPS)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("lam", [0.0, 1e-3, 0.1, 1.0, 10.0])
def test_matches_closed_form(op, lam):
    z = torch.linspace(-30, 30, 2001, dtype=torch.float64)
    torch.testing.assert_close(compress(z, lam, op), ref.s(z, lam, op), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("op", OPS)
def test_properties_odd_monotone_slope_one_shrinking(op):
    z = torch.linspace(0, 20, 401, dtype=torch.float64)
    for lam in (0.05, 0.5, 5.0):
        c = compress(z, lam, op)
        assert torch.equal(compress(-z, lam, op), -c)  # odd
        assert (c.diff() >= -1e-15).all() and (c.diff()[:40] > 0).all()  # monotone up to an ulp (tanh saturates)
        assert (c[1:] < z[1:]).all()  # shrinks
        ratio = c[1:] / z[1:]
        assert (ratio.diff() <= 1e-15).all()  # large |z| shrunk more than small
        h = torch.tensor([1e-7], dtype=torch.float64)
        assert abs(compress(h, lam, op).item() / 1e-7 - 1) < 1e-5  # slope 1 at 0


@pytest.mark.parametrize("op", OPS)
def test_lambda_zero_is_exact_identity_and_limit(op):
    z = torch.randn(1000) * 5
    assert torch.equal(compress(z, 0.0, op), z)
    zz = z.double()
    assert (compress(zz, 1e-9, op) - zz).abs().max() < 1e-6


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("lam", [0.0, 0.3, 2.0])
def test_gradients_finite_at_z_zero(op, lam):
    z = torch.tensor([0.0, -0.0, 1e-30, 3.0], dtype=torch.float64, requires_grad=True)
    lam_t = torch.tensor(lam, dtype=torch.float64, requires_grad=True)
    compress(z, lam_t, op).sum().backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(lam_t.grad)
    assert abs(z.grad[0].item() - 1.0) < 1e-12  # slope 1 at z = 0


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("lam", [0.05, 0.7, 4.0])
def test_gradcheck(op, lam):
    z = (torch.randn(40, dtype=torch.float64) * 3).requires_grad_()
    lam_t = torch.tensor(lam, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: compress(a, b, op), (z, lam_t))


@pytest.mark.parametrize("op", OPS)
def test_lambda_gradient_at_zero_is_one_sided_derivative(op):
    z = torch.randn(50, dtype=torch.float64) * 3
    lam = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    compress(z, lam, op).sum().backward()
    h = 1e-5  # second-order one-sided stencil: λ < 0 is outside the domain
    fd = (-3 * ref.s(z, 0.0, op) + 4 * ref.s(z, h, op) - ref.s(z, 2 * h, op)).sum() / (2 * h)
    assert abs(lam.grad.item() - fd.item()) < 1e-4 * max(1.0, abs(fd.item()))
    if op != "tanh":  # tanh(λz)/λ is flat in λ at 0; the others move
        assert lam.grad.item() != 0.0


def test_unknown_op():
    with pytest.raises(ValueError, match="unknown compression op"):
        compress(torch.zeros(3), 0.1, "cubic")
