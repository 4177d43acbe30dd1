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


def _force_split(monkeypatch, chunk=64, tile=32):
    # The split backward at test sizes: several row chunks and column tiles (uneven last ones).
    ops = dispatch.triton_ops()
    cfg = ops.BackwardConfig(1, True, chunk=chunk, tile=tile, tile_warps=1)
    monkeypatch.setattr(ops, "backward_config", lambda *args: cfg)


STRATEGIES = ["one-block", "split"]
# Compiled, the wide-row GPU tests (8192 with a learnable λ, 16384, 65536) take the split backward
# at real shapes; the small forced-split copies would only add compile time to the GPU check.
STRATEGIES_CPU = ["one-block"] if GPU else STRATEGIES


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
@pytest.mark.parametrize("m,n", [(5, 130)] if GPU else [(7, 37), (5, 130)])  # GPU: fewer compiles
@pytest.mark.parametrize("strategy", STRATEGIES_CPU)
def test_kernel_matches_reference_fp32(monkeypatch, op, centered, per_channel, lam_value, m, n, strategy):
    if strategy == "split":
        _force_split(monkeypatch)
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


@pytest.mark.parametrize("strategy", STRATEGIES_CPU)
def test_backward_is_deterministic(monkeypatch, strategy):
    if strategy == "split":
        _force_split(monkeypatch)
    x, w, b, lam, dy = _case(12, 96, True, True, 0.5, torch.float32)  # 3 rows per program on CPU
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


def test_torch_compile_traces_the_custom_op():
    import ibnorm

    m = ibnorm.IBLayerNorm(24, lam=0.4, op="log").to(DEVICE)
    x = torch.randn(3, 24, device=DEVICE)
    eager = m(x)
    explanation = torch._dynamo.explain(m)(x)
    assert explanation.graph_break_count == 0
    torch.testing.assert_close(torch.compile(m, backend="eager")(x), eager)


@pytest.mark.parametrize("centered", [False, True])
def test_compiled_backward_with_gradients_not_wanted(centered):
    # A fixed λ (and no bias for rms) leaves two gradients unwanted: the custom op must return two
    # distinct empty tensors (outputs may not alias), called directly and inside a compiled graph.
    import ibnorm

    cls = ibnorm.IBLayerNorm if centered else ibnorm.IBRMSNorm
    m = cls(24, lam=0.4, op="tanh").to(DEVICE)
    x = torch.randn(3, 24, device=DEVICE, requires_grad=True)
    y, stats = dispatch.triton_ops().row_norm_fwd_op(x.detach(), m.weight.detach(), None, m.lam, "tanh", m.eps, False)
    grads = dispatch.triton_ops().row_norm_bwd_op(torch.ones_like(y), x.detach(), m.weight.detach(), m.lam, stats, "tanh",
                                                  False, [True, True, False, False])
    assert [g.numel() for g in grads] == [x.numel(), 24, 0, 0]
    eager = torch.autograd.grad(m(x).square().sum(), [x, m.weight])
    compiled = torch.autograd.grad(torch.compile(m, backend="aot_eager")(x).square().sum(), [x, m.weight])
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


def _dominated(m, n, big, dtype=torch.float32, seed=1):
    """Rows where one channel carries a massive activation: |z| of that channel ≈ √n."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=g)
    x[:, (torch.arange(m) * 7) % n] = 0.0
    x[torch.arange(m), (torch.arange(m) * 7) % n] = big * torch.where(torch.arange(m) % 2 == 0, 1.0, -1.0)
    w = torch.randn(n, generator=g)
    b = torch.randn(n, generator=g)
    dy = torch.randn(m, n, generator=g)
    return [t.to(DEVICE, dtype) for t in (x, w, b, dy)]


def _rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("lam_value", [1.0, 10.0])
@pytest.mark.parametrize("strategy", STRATEGIES_CPU)
def test_extreme_activations_match_reference(monkeypatch, op, centered, lam_value, strategy):
    # u = λ|z| reaches 10·√256 = 160 (past exp overflow of the old expm1(2u) form at 44).
    if strategy == "split":
        _force_split(monkeypatch)
    n = 256
    x, w, b, dy = _dominated(6, n, 2000.0)
    b = b if centered else None
    lam = torch.full((n,), lam_value, device=DEVICE)
    lam[::5] = 0.0
    for lam_t in (torch.tensor(lam_value, device=DEVICE), lam):
        y, grads = _run(dispatch.row_norm, x, w, b, lam_t, dy, n, op, centered)
        y_ref, grads_ref = _run(_reference, x, w, b, lam_t, dy.double(), n, op, centered)
        assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
        assert _rel_err(y, y_ref) < 1e-5
        for got, want in zip(grads, grads_ref):
            assert _rel_err(got, want) < 1e-4


@pytest.mark.parametrize("op", OPS)
def test_one_channel_dominating_wide_row(op):
    # H = 4096: |z| ≈ 64 on the dominant channel, the NaN case of the old kernel at λ = 1.
    n = 4096
    x, w, b, dy = _dominated(2, n, 2000.0)
    lam = torch.tensor(1.0, device=DEVICE)
    y, grads = _run(dispatch.row_norm, x, w, None, lam, dy, n, op, False)
    y_ref, grads_ref = _run(_reference, x, w, None, lam, dy.double(), n, op, False)
    assert _rel_err(y, y_ref) < 1e-5
    for got, want in zip(grads, grads_ref):
        assert _rel_err(got, want) < 1e-4


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
def test_lambda_zero_is_structurally_exact(centered, per_channel):
    # At λ = 0 step 4 must be the identity bit for bit: k == 1 and μ_c == 0 exactly, y == z·γ (+β).
    ops = dispatch.triton_ops()
    n = 96
    x, w, b, _ = _dominated(5, n, 300.0)
    b = b if centered else None
    lam = torch.zeros((n,) if per_channel else (), device=DEVICE)
    for op in OPS:
        y, stats = ops.row_norm_fwd_op(x, w, b, lam, op, 1e-5, centered)
        assert torch.equal(stats[:, 7], torch.ones_like(stats[:, 7])) and torch.equal(stats[:, 2], torch.zeros_like(stats[:, 2]))
        z = ((x - stats[:, :1]) if centered else x) * stats[:, 1:2]
        want = z * (1.0 * w) + b if centered else z * (1.0 * w)
        if GPU and centered:  # compiled code may fuse z·γ + β into one FMA (one rounding fewer)
            assert _rel_err(y, want.double()) < 1e-6, op
        else:
            assert torch.equal(y, want), op


def test_lambda_zero_equals_torch_norms_tightly():
    x, w, b, _ = _dominated(9, 48, 50.0)
    lam = torch.zeros((), device=DEVICE)
    y = dispatch.row_norm(x, (48,), w, None, lam, "tanh", 1e-6, False)
    torch.testing.assert_close(y, torch.nn.functional.rms_norm(x, (48,), w, 1e-6), rtol=2e-6, atol=2e-6)
    y = dispatch.row_norm(x, (48,), w, b, lam, "log", 1e-5, True)
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (48,), w, b, 1e-5), rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("wanted", [("x",), ("w",), ("lam",), ("b", "lam"), ("x", "w", "b")])
@pytest.mark.parametrize("strategy", STRATEGIES_CPU)
def test_only_requested_gradients(monkeypatch, wanted, strategy):
    if strategy == "split":
        _force_split(monkeypatch)
    n = 40
    x, w, b, lam, dy = _case(4, n, True, True, 0.5, torch.float32)
    names = ("x", "w", "b", "lam")
    leaves = {k: t.detach().clone().requires_grad_(k in wanted) for k, t in zip(names, (x, w, b, lam))}
    y = dispatch.row_norm(leaves["x"], (n,), leaves["w"], leaves["b"], leaves["lam"], "power", 1e-5, True)
    got = torch.autograd.grad(y, [leaves[k] for k in wanted], dy)
    _, want = _run(_reference, x, w, b, lam, dy.double(), n, "power", True)
    for k, g in zip(wanted, got):
        assert _rel_err(g, want[names.index(k)]) < 2e-5, k


def test_empty_batch():
    w = torch.randn(32, device=DEVICE, requires_grad=True)
    lam = torch.tensor(0.5, device=DEVICE, requires_grad=True)
    x = torch.randn(0, 32, device=DEVICE, requires_grad=True)
    y = dispatch.row_norm(x, (32,), w, None, lam, "tanh", 1e-6, False)
    assert y.shape == (0, 32)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and lam.grad.item() == 0.0


GPU_ONLY = pytest.mark.skipif(not GPU, reason="needs a GPU (IBNORM_GPU_TESTS=1)")


GPU_CASES = [(n, torch.bfloat16, 2e-2) for n in (8192, 16384, 65536)] + [(8192, torch.float16, 5e-3), (8192, torch.float32, 1e-4)]


@GPU_ONLY
@pytest.mark.parametrize("n,dtype,tol", GPU_CASES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("centered", [False, True])
def test_kernel_gpu_wide_rows(n, dtype, tol, op, centered):
    # Stated tolerances (relative to max |reference|, against float64): bf16 2e-2, fp16 5e-3, fp32 1e-4.
    x, w, b, lam, dy = _case(64, n, centered, True, 0.4, dtype)
    x[1:3] = _dominated(2, n, 2000.0, dtype)[0]  # rows with |z| ≈ √H
    y, grads = _run(dispatch.row_norm, x, w, b, lam, dy, n, op, centered)
    y_ref, grads_ref = _run(_reference, x, w, b, lam, dy.double(), n, op, centered)
    assert _rel_err(y, y_ref) < tol
    for got, want in zip(grads, grads_ref):
        assert _rel_err(got, want) < tol * 4


@GPU_ONLY
@pytest.mark.parametrize("op", OPS)
def test_gpu_large_lambda_is_finite_and_right(op):
    x, w, b, dy = _dominated(16, 8192, 2000.0)
    lam = torch.tensor(10.0, device=DEVICE)
    y, grads = _run(dispatch.row_norm, x, w, b, lam, dy, 8192, op, True)
    y_ref, grads_ref = _run(_reference, x, w, b, lam, dy.double(), 8192, op, True)
    assert _rel_err(y, y_ref) < 1e-4
    for got, want in zip(grads, grads_ref):
        assert _rel_err(got, want) < 4e-4


@GPU_ONLY
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_lambda_zero_exact(dtype):
    ops = dispatch.triton_ops()
    x, w, b, _ = _dominated(32, 8192, 500.0, dtype)
    for centered in (False, True):
        y, stats = ops.row_norm_fwd_op(x, w, b if centered else None, torch.zeros((), device=DEVICE), "tanh", 1e-5, centered)
        assert torch.equal(stats[:, 7], torch.ones_like(stats[:, 7])) and torch.equal(stats[:, 2], torch.zeros_like(stats[:, 2]))
        ref = torch.nn.functional.layer_norm(x, (8192,), w, b, 1e-5) if centered else torch.nn.functional.rms_norm(x, (8192,), w, 1e-5)
        assert _rel_err(y, ref.double()) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("shape", ["split", "split-chunks", "one-block", "prefetch", "prefetch+2-per-SM"])
@pytest.mark.parametrize("centered", [False, True])
def test_backward_launch_shapes_match_reference(monkeypatch, centered, shape):
    # Every launch shape backward_config can choose, forced here.  One block: PREFETCH loads a
    # program's next row early (5 rows over 4 or 8 programs: programs with two rows, one row and
    # none, so the last row's prefetch is masked).  SPLIT: row sums, then column tiles;
    # "split-chunks" walks the row in 64-column steps and 32-column tiles, with uneven last ones
    # (130 columns; one row block: 5 tiles take the programs; uneven row blocks: the 7 × 37 cases
    # of test_kernel_matches_reference_fp32 run blocks of 3, 3 and 1).
    ops = dispatch.triton_ops()
    split = shape.startswith("split")
    cfg = ops.BackwardConfig(1, split, programs_per_sm=2 if "2-per-SM" in shape else 1,
                             prefetch="prefetch" in shape, chunk=64 if shape == "split-chunks" else 2048,
                             tile=32 if shape == "split-chunks" else 1024, tile_warps=1)
    monkeypatch.setattr(ops, "backward_config", lambda *args: cfg)
    n = 130
    x, w, b, lam, dy = _case(5, n, centered, True, 0.6, torch.float32)
    x[1] = _dominated(1, n, 2000.0)[0][0]
    for op in OPS:
        y, grads = _run(dispatch.row_norm, x, w, b, lam, dy, n, op, centered)
        _, grads_ref = _run(_reference, x, w, b, lam, dy.double(), n, op, centered)
        for got, want in zip(grads, grads_ref):
            assert _rel_err(got, want) < 1e-4, op


def test_channel_variants_use_reference_off_cuda(monkeypatch):
    from ibnorm.kernels import channel_norm

    assert not channel_norm.use_compiled(torch.randn(2, 3))
    monkeypatch.setenv("IBNORM_KERNEL", "reference")
    assert not channel_norm.use_compiled(torch.randn(2, 3, device=DEVICE))


@GPU_ONLY
def test_gpu_channel_variants_compiled_path():
    # IBBatchNorm2d (train: running buffers too) and IBGroupNorm on CUDA go through torch.compile.
    import ibnorm

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(8, 32, 10, 10, generator=g) * 3 + 1).to(DEVICE)
    dy = torch.randn(8, 32, 10, 10, generator=g).to(DEVICE)
    for make in (lambda: ibnorm.IBGroupNorm(4, 32, op="log", lam=0.7), lambda: ibnorm.IBBatchNorm2d(32, op="tanh", lam=0.9)):
        mod, twin = make().to(DEVICE), make().to(DEVICE)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = mod(xa)
        os.environ["IBNORM_KERNEL"] = "reference"  # the force_triton fixture restores it
        yb = twin(xb)
        os.environ["IBNORM_KERNEL"] = "triton"
        assert _rel_err(ya, yb.double()) < 1e-5
        ga = torch.autograd.grad(ya, [xa, mod.weight], dy)
        gb = torch.autograd.grad(yb, [xb, twin.weight], dy)
        for a, b in zip(ga, gb):
            assert _rel_err(a, b.double()) < 1e-4
        for name, buf in mod.named_buffers():
            torch.testing.assert_close(buf, dict(twin.named_buffers())[name])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_compression_and_its_gradients_across_the_series_seams(monkeypatch, op, strategy):
    # The kernels join series and closed forms at fixed arguments (u = λ|z| = 0.1, 0.25, 0.3; power's
    # |z| = 0.1 and v = 0.25).  One row holding a fine grid of z (zero-padded), a per-channel λ (so
    # dλ_j is one element's ∂s/∂λ times its dc) and λ = 0 on every 7th channel: y, dx, dγ and dλ
    # elementwise against float64 on both sides of every seam, through both backward strategies.
    if strategy == "split":
        _force_split(monkeypatch, chunk=512, tile=256)
    n = 2048
    grid = torch.linspace(-1.0, 1.0, 1601, dtype=torch.float64)
    x = torch.cat([grid, torch.zeros(n - grid.numel(), dtype=torch.float64)])[None]
    z_max = (n / grid.square().sum()).sqrt().item()  # z = x·√(n/Σx²): the grid, scaled to ±z_max
    g = torch.Generator().manual_seed(5)
    dy = torch.randn(1, n, generator=g, dtype=torch.float64)
    w = 1.0 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    for lam_value in (0.5 / z_max, 0.9 / z_max, 1.8 / z_max):  # u up to 0.5, 0.9, 1.8
        lam = torch.full((n,), lam_value, dtype=torch.float64)
        lam[::7] = 0.0
        args = [t.float().to(DEVICE) for t in (x, w, lam, dy)]
        y, grads = _run(dispatch.row_norm, args[0], args[1], None, args[2], args[3], n, op, False)
        y_ref, grads_ref = _run(_reference, x, w, None, lam, dy, n, op, False)
        torch.testing.assert_close(y.double().cpu(), y_ref, rtol=2e-5, atol=2e-6)
        for got, want, name in zip(grads, grads_ref, ("dx", "dγ", "dλ")):
            scale = want.abs().max().item()
            torch.testing.assert_close(got.double().cpu(), want, rtol=2e-4, atol=2e-6 * scale, msg=f"{op} {name}")
        if op == "tanh":  # ∂s/∂λ is 0 at λ = 0: exactly, not O(1e-30)
            assert torch.equal(grads[2][::7].cpu(), torch.zeros_like(grads[2][::7].cpu()))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_lambda_below_the_floor_acts_as_zero(monkeypatch, strategy):
    # λ < 1e-30 is 0 in the kernels (u = λ|z| is below float32 resolution); tanh's dλ there must be
    # the reference's O(λ) value to float32 resolution, not the gradient of λ = 1e-30 (1e5× larger).
    if strategy == "split":
        _force_split(monkeypatch)
    x, w, b, _, dy = _case(5, 130, True, False, 0.5, torch.float32)
    for lam in (torch.tensor(1e-35, device=DEVICE), torch.full((130,), 1e-35, device=DEVICE)):
        for op in OPS:
            y, grads = _run(dispatch.row_norm, x, w, b, lam, dy, 130, op, True)
            y_ref, grads_ref = _run(_reference, x, w, b, lam.double(), dy.double(), 130, op, True)
            assert _rel_err(y, y_ref) < 1e-5
            for got, want in zip(grads[:3], grads_ref[:3]):
                assert _rel_err(got, want) < 1e-4, op
            tol = 1e-30 if op == "tanh" else 1e-4 * grads_ref[3].abs().max().item()  # tanh: O(λ) → ~1e-33
            assert (grads[3].double() - grads_ref[3]).abs().max().item() < tol, op


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rows_with_a_large_mean(monkeypatch, strategy):
    # z = (x − mean)·rstd is exact by Sterbenz where x·rstd − mean·rstd would lose ulp(mean·rstd):
    # with an offset of 1500σ that form's worst gradient error here is 1.4e-4, the exact form's 8.3e-5
    # (the rest is the float32 mean itself).  Compiled reductions round differently: a looser bound.
    if strategy == "split":
        _force_split(monkeypatch)
    x, w, b, lam, dy = _case(8, 256, True, True, 0.3, torch.float32, seed=2)
    x = x + 3000.0
    for op in ("tanh", "log"):
        y, grads = _run(dispatch.row_norm, x, w, b, lam, dy, 256, op, True)
        y_ref, grads_ref = _run(_reference, x, w, b, lam, dy.double(), 256, op, True)
        assert _rel_err(y, y_ref) < 1e-4
        for got, want in zip(grads, grads_ref):
            assert _rel_err(got, want) < (3e-4 if GPU else 1.1e-4), op
