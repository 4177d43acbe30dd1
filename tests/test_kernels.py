"""Fused Triton kernels against the reference: forward, dx, dγ, dβ, dλ.

On CPU (CI) the kernels run under TRITON_INTERPRET=1.  On a GPU machine run
``IBNORM_GPU_TESTS=1 python -m pytest tests/test_kernels.py`` for the compiled kernels in bf16/fp16.
"""

import os

import pytest
import torch

from ibnorm import functional as IBF
from ibnorm.kernels import dispatch

OPS = ["tanh", "log", "power"]
GPU = os.environ.get("IBNORM_GPU_TESTS") == "1" and torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"

pytestmark = pytest.mark.skipif(dispatch.triton_ops() is None, reason="triton is not importable")


@pytest.fixture(autouse=True)
def force_triton(monkeypatch):
    monkeypatch.setenv("IBNORM_KERNEL", "triton")


def _case(m, n, centered, per_channel, lam_value, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=g) * 2 + 0.3
    x[0, n // 3] = 25.0  # a massive activation
    w = torch.randn(n, generator=g)
    b = torch.randn(n, generator=g) if centered else None
    if per_channel:
        lam = torch.rand(n, generator=g) * 2 * lam_value
        lam[::3] = 0.0
    else:
        lam = torch.tensor(lam_value)
    dy = torch.randn(m, n, generator=g)
    to = lambda t: None if t is None else t.to(DEVICE, dtype if t.dim() > 1 or t is w or t is b else torch.float32)
    return to(x), to(w), to(b), to(lam), to(dy)


def _run(fn, x, w, b, lam, dy, n, op, centered):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, lam)]
    y = fn(leaves[0], (n,), leaves[1], leaves[2], leaves[3], op, 1e-5, centered)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy)
    return y, grads


def _reference(x, shape, w, b, lam, op, eps, centered):
    # float64 reference on the same inputs
    y = IBF.ib_row_norm(x.double(), shape, w.double(), None if b is None else b.double(), lam.double(), op, eps, centered)
    return y


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("lam_value", [0.0, 0.6])
@pytest.mark.parametrize("m,n", [(7, 37), (33, 64), (5, 130)])
def test_kernel_matches_reference_fp32(op, centered, per_channel, lam_value, m, n):
    x, w, b, lam, dy = _case(m, n, centered, per_channel, lam_value, torch.float32)
    y, grads = _run(dispatch.row_norm, x, w, b, lam, dy, n, op, centered)
    y_ref, grads_ref = _run(_reference, x, w, b, lam, dy.double(), n, op, centered)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    for name, got, want in zip(("dx", "dw", "db" if centered else "dlam", "dlam"), grads, grads_ref):
        scale = want.abs().max().clamp_min(1.0)
        assert (got.double() - want).abs().max() / scale < 2e-5, name


def test_lambda_zero_equals_rmsnorm_and_layernorm():
    x = torch.randn(9, 48, device=DEVICE) * 3
    w = torch.randn(48, device=DEVICE)
    b = torch.randn(48, device=DEVICE)
    lam = torch.zeros((), device=DEVICE)
    y = dispatch.row_norm(x, (48,), w, None, lam, "log", 1e-6, False)
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, (48,), w, 1e-6), rtol=1e-5, atol=1e-5)
    y = dispatch.row_norm(x, (48,), w, b, lam, "power", 1e-5, True)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (48,), w, b, 1e-5), rtol=1e-5, atol=1e-5)


def test_non_contiguous_and_3d_inputs():
    base = torch.randn(4, 40, 6, device=DEVICE)
    x = base.transpose(1, 2)  # (4, 6, 40), last dim strided
    assert not x.is_contiguous()
    w = torch.randn(40, device=DEVICE)
    lam = torch.rand(40, device=DEVICE)
    y = dispatch.row_norm(x, (40,), w, None, lam, "tanh", 1e-6, False)
    want = IBF.ib_row_norm(x, (40,), w, None, lam, "tanh", 1e-6, False)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def test_backward_is_deterministic():
    x, w, b, lam, dy = _case(64, 96, True, True, 0.5, torch.float32)
    _, g1 = _run(dispatch.row_norm, x, w, b, lam, dy, 96, "log", True)
    _, g2 = _run(dispatch.row_norm, x, w, b, lam, dy, 96, "log", True)
    for a, c in zip(g1, g2):
        assert torch.equal(a, c)


def test_modules_use_the_kernel(monkeypatch):
    import ibnorm

    calls = []
    ops = dispatch.triton_ops()
    real = ops.row_norm_op
    monkeypatch.setattr(ops, "row_norm_op", lambda *a: calls.append(1) or real(*a))
    m = ibnorm.IBRMSNorm(32, lam=0.3, op="tanh", learnable_lam=True).to(DEVICE)
    m(torch.randn(3, 32, device=DEVICE)).sum().backward()
    assert calls and m.lam.grad is not None


def test_reference_mode_and_fallback(monkeypatch):
    monkeypatch.setenv("IBNORM_KERNEL", "reference")
    assert not dispatch.use_triton(torch.randn(2, 8, device=DEVICE), (8,))
    monkeypatch.setenv("IBNORM_KERNEL", "auto")
    assert not dispatch.use_triton(torch.randn(2, 8), (8,))  # CPU tensors: reference in auto mode
    monkeypatch.setenv("IBNORM_KERNEL", "bogus")
    with pytest.raises(ValueError, match="IBNORM_KERNEL"):
        dispatch.kernel_mode()


@pytest.mark.skipif(not GPU, reason="needs a GPU (IBNORM_GPU_TESTS=1)")
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("centered", [False, True])
def test_kernel_low_precision_gpu(dtype, tol, op, centered):
    # Stated tolerances: bf16 2e-2, fp16 5e-3 (relative to max |reference|), against float64.
    x, w, b, lam, dy = _case(256, 4096, centered, True, 0.4, dtype)
    y, grads = _run(dispatch.row_norm, x, w, b, lam, dy, 4096, op, centered)
    y_ref, grads_ref = _run(_reference, x, w, b, lam, dy.double(), 4096, op, centered)
    assert (y.double() - y_ref).abs().max() / y_ref.abs().max() < tol
    for got, want in zip(grads, grads_ref):
        assert (got.double() - want).abs().max() / want.abs().max().clamp_min(1e-6) < tol * 4


def test_torch_compile_traces_the_custom_op():
    import ibnorm

    m = ibnorm.IBLayerNorm(24, lam=0.4, op="log").to(DEVICE)
    x = torch.randn(3, 24, device=DEVICE)
    eager = m(x)
    explanation = torch._dynamo.explain(m)(x)
    assert explanation.graph_break_count == 0
    torch.testing.assert_close(torch.compile(m, backend="eager")(x), eager)
