"""The CPU fast path (ibnorm.kernels.cpu_rownorm) against the float64 reference, and its dispatch.

Also the vectorized λ-grid errors of calibration against a float64 computation.
"""

import copy

import pytest
import torch
from torch import nn

import ibnorm
import reference64 as ref
from ibnorm import functional as IBF
from ibnorm.calibration.fit import LAMBDA_GRID, admissible_lambda, channel_errors
from ibnorm.kernels import cpu_fused, cpu_rownorm, torch_rownorm

OPS = ["tanh", "log", "power"]
H = 40


def _case(centered: bool, per_channel: bool, dtype=torch.float32, degenerate: bool = True):
    x = torch.randn(3, 5, H) * 2 + (0.5 if centered else 0.0)
    x[0, 0, 3] = 40.0  # a massive activation
    if degenerate:
        x[1, 2] = 0.0  # a zero row
        x[2, 1] = 3.0  # a constant row
    w = torch.randn(H) * 0.5 + 1.0
    b = torch.randn(H) * 0.3 if centered else None
    if per_channel:  # λ ≥ 0.05 takes the logistic form of tanh; smaller λ are recomputed, or the series form
        lam = torch.rand(H) * 2.5 + (0.05 if per_channel == "large" else 0.001)
        lam[::5] = 0.0  # some channels left exact
    else:
        lam = torch.tensor(0.7)
    return x.to(dtype), w.to(dtype), None if b is None else b.to(dtype), lam


@pytest.fixture(params=["c", "torch"])
def path(request, monkeypatch):
    """Both CPU forms: the fused C function (at inference) and the few-op torch form."""
    if request.param == "c":
        if not cpu_fused.available():
            pytest.skip("no C compiler: the torch form serves")
        calls = []
        real = cpu_fused.row_norm
        monkeypatch.setattr(cpu_fused, "row_norm", lambda *a: calls.append(1) or real(*a))
        yield "c"
        assert calls, "the C kernel was not used"
    else:
        monkeypatch.setattr(cpu_fused, "applies", lambda *a: False)
        yield "torch"


def _fast(x, w, b, lam, op, centered, eps=1e-5):
    y = cpu_rownorm.row_norm(x, (H,), w, b, lam, op, eps, centered)
    assert y is not None, "the fast path declined"
    return y


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("per_channel", [False, "large", "small"])
def test_forward_float32_matches_float64_reference(op, centered, per_channel, path):
    x, w, b, lam = _case(centered, per_channel)
    got = _fast(x, w, b, lam, op, centered)
    want = ref.row_norm(x.double(), w, b, lam.double(), op, 1e-5, centered)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("centered", [False, True])
def test_forward_bfloat16_is_within_rounding_of_reference(op, centered, path):
    x, w, b, lam = _case(centered, True, torch.bfloat16)
    got = _fast(x, w, b, lam, op, centered)
    assert got.dtype == torch.bfloat16
    want = ref.row_norm(x.double(), w.double(), None if b is None else b.double(), lam.double(), op, 1e-5, centered)
    # The result is computed in float32 and rounded once: within one bf16 ulp (2^-8 relative).
    torch.testing.assert_close(got.double(), want, rtol=2 ** -8, atol=1e-2)


def test_multi_dimensional_normalized_shape(path):
    x = torch.randn(4, 6, 8) * 3
    lam = torch.rand(6, 8)
    lam[0] = 0.0
    w, b = torch.randn(6, 8), torch.randn(6, 8)
    got = cpu_rownorm.row_norm(x, (6, 8), w, b, lam, "log", 1e-5, True)
    xr = x.double().reshape(4, 48)
    want = ref.row_norm(xr, w.reshape(-1), b.reshape(-1), lam.reshape(-1).double(), "log", 1e-5, True).reshape(4, 6, 8)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_float64_reference(op, centered, dtype):
    # bf16: no constant rows, whose gradient (~1/√ε) is quantized to bf16 on its way back
    x, w, b, lam = _case(centered, True, dtype, degenerate=dtype == torch.float32)
    params = [t.detach().clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    y = _fast(params[0], params[1], params[2] if b is not None else None, lam, op, centered)
    g = torch.randn(y.shape)
    (y.float() * g).sum().backward()
    p64 = [t.detach().double().requires_grad_() for t in params]
    y64 = ref.row_norm(p64[0], p64[1], p64[2] if b is not None else None, lam.double(), op, 1e-5, centered)
    (y64 * g.double()).sum().backward()
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    for got, want in zip(params, p64):
        torch.testing.assert_close(got.grad.double(), want.grad, **tol)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("centered", [False, True])
def test_lambda_zero_is_the_reference_bit_for_bit(op, dtype, centered):
    x, w, b, _ = _case(centered, False, dtype)
    for lam in (torch.tensor(0.0), torch.zeros(H)):
        got = _fast(x, w, b, lam, op, centered)
        want = IBF.ib_row_norm(x, (H,), w, b, lam, op, 1e-5, centered)
        assert torch.equal(got, want)


def test_lambda_zero_equals_torch_rmsnorm_and_hf_llama_rmsnorm_bit_for_bit():
    x = torch.randn(2, 7, H) * 3
    src = nn.RMSNorm(H, eps=1e-6)
    with torch.no_grad():
        src.weight.normal_(1.0, 0.5)
    ib = ibnorm.from_module(src).eval()
    with torch.no_grad():
        y = ib(x)
    # torch's own formula (x · rsqrt(mean x² + eps) · w, float32), as HF's LlamaRMSNorm writes it
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * src.weight
    assert torch.equal(y, want.detach())
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    hf = llama.LlamaRMSNorm(H, eps=1e-6)
    hf.weight.data.copy_(src.weight.data)
    ib_hf = ibnorm.from_module(hf).eval()
    with torch.no_grad():
        assert torch.equal(ib_hf(x), hf(x))


def test_cached_constants_follow_in_place_lambda_updates(path):
    x, w, _, lam = _case(False, True)
    lam = lam.clone()
    before = _fast(x, w, None, lam, "tanh", False)
    with torch.no_grad():
        lam.mul_(0.5)  # in place: same tensor object, new version
    after = _fast(x, w, None, lam, "tanh", False)
    want = ref.row_norm(x.double(), w, None, lam.double(), "tanh", 1e-5, False)
    torch.testing.assert_close(after.double(), want, rtol=2e-5, atol=2e-5)
    assert not torch.allclose(before, after)


def test_dispatch_uses_fast_path_on_cpu_and_reference_for_learnable_lambda(monkeypatch):
    calls = []
    real = cpu_rownorm.row_norm
    monkeypatch.setattr(cpu_rownorm, "row_norm", lambda *a: calls.append(1) or real(*a))
    m = ibnorm.IBRMSNorm(H, lam=0.4).eval()
    x = torch.randn(3, H)
    m(x)
    assert len(calls) == 1
    monkeypatch.setenv("IBNORM_KERNEL", "reference")
    m(x)
    assert len(calls) == 1
    monkeypatch.delenv("IBNORM_KERNEL")
    learn = ibnorm.IBRMSNorm(H, lam=0.4, learnable_lam=True)
    learn(x).sum().backward()  # λ gets its gradient from the reference
    assert len(calls) == 1 and learn.lam.grad is not None
    with torch.no_grad():
        learn(x)  # no gradient wanted: the fast path serves
    assert len(calls) == 2


def test_tiny_positive_lambda_defers_to_reference():
    x, w, _, _ = _case(False, False)
    assert cpu_rownorm.row_norm(x, (H,), w, None, torch.tensor(1e-30), "log", 1e-5, False) is None
    m = ibnorm.IBRMSNorm(H, lam=1e-30, op="log")
    # s_λ(z) = z(1 − λ|z|/2 + …): at λ = 1e-30 the λ → 0 limit (the naive float64 formula underflows)
    want = ref.row_norm(x.double(), m.weight.detach(), None, 0.0, "log", 1e-6, False)
    torch.testing.assert_close(m(x).double(), want.detach(), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("centered", [False, True])
def test_vectorized_grid_errors_match_float64(op, centered):
    z = torch.randn(3000, 12)
    z[:, 0] = z[:, 0] * 0.5 + 10.0  # a massive-activation channel: large mean, small spread
    z[:, 1] = torch.distributions.StudentT(3.0).sample((3000,))  # heavy tails
    got = channel_errors(z, op, LAMBDA_GRID, centered)
    z64 = z.double()
    for i, lam in enumerate(LAMBDA_GRID):
        c = ref.s(z64, lam, op)
        zc, cc = (z64 - z64.mean(0), c - c.mean(0)) if centered else (z64, c)
        want = 1 - (cc * zc).sum(0) ** 2 / ((cc * cc).sum(0) * (zc * zc).sum(0))
        # Beyond λ·z̄ ≈ 3 float32 s_λ(z̄ + δz) saturates for the massive channel (for any
        # float32 implementation): compare it only below that.
        cols = slice(None) if lam <= 0.3 else slice(1, None)
        # float32 compression and block sums: ~2e-7 absolute, as the per-λ float32 form had; tolerances
        # the fit compares against are ≥ 1e-4.
        torch.testing.assert_close(got[i, cols].double(), want[cols], rtol=1e-4, atol=5e-7)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("tol", [1e-4, 1e-3, 2e-2])
def test_pruned_lambda_search_picks_what_the_full_grid_picks(op, centered, tol):
    # Channels leave the search at their first failing λ; the choice must be the full grid's: per
    # channel the last point of the leading run of errors ≤ tol (float64 reference errors here).
    torch.manual_seed(1)
    # Channels that tolerate very different λ: bounded (uniform), Gaussian, heavy tails, massive.
    kinds = [torch.rand(1500, 10) * 2 - 1, torch.randn(1500, 10), torch.distributions.StudentT(4.0).sample((1500, 10)),
             torch.distributions.StudentT(1.5).sample((1500, 10))]
    z = torch.cat(kinds, 1)
    z[:, 0] = torch.randn(1500) * 0.3 + 8.0
    z = (z - z.mean(0)) / z.std(0) if centered else z / z.square().mean(0).sqrt()
    z64 = z.double()
    ok = []
    for lam in LAMBDA_GRID:
        c = ref.s(z64, lam, op)
        zc, cc = (z64 - z64.mean(0), c - c.mean(0)) if centered else (z64, c)
        ok.append(1 - (cc * zc).sum(0) ** 2 / ((cc * cc).sum(0) * (zc * zc).sum(0)) <= tol)
    leading = torch.stack(ok).int().cumprod(0).sum(0)
    want = torch.tensor(LAMBDA_GRID, dtype=torch.float32)[(leading - 1).clamp_min(0)]
    got = admissible_lambda(z, op, LAMBDA_GRID, centered, tol)
    # A channel whose error sits within float32 rounding of tol may land either side: allow one grid step there.
    full = channel_errors(z, op, LAMBDA_GRID, centered)
    assert torch.equal(got, torch.tensor(LAMBDA_GRID)[(full <= tol).int().cumprod(0).sum(0).sub(1).clamp_min(0)])
    assert (got == want).float().mean() >= 0.95 and len(set(want.tolist())) >= 2


def test_a_bf16_layer_gets_the_lambda_its_float32_values_get():
    # The grid errors (1 − corr² ~ 1e-3) must be computed from the values, not from bf16 rounding:
    # the same weights and inputs, held in bf16 or float32, calibrate to the same λ.
    from ibnorm.calibration import fit_layer
    from ibnorm.recognize import recognize

    torch.manual_seed(2)
    x = torch.cat([torch.randn(2048, 64), torch.distributions.StudentT(3.0).sample((2048, 64)),
                   torch.rand(2048, 64) * 4 - 2], 1).bfloat16()
    norm32 = torch.nn.RMSNorm(192, eps=1e-6)
    with torch.no_grad():
        norm32.weight.normal_(1.0, 0.2)
    norm16 = copy.deepcopy(norm32).bfloat16()
    fit16 = fit_layer(recognize(norm16), norm16, x, "tanh", 1e-3)
    fit32 = fit_layer(recognize(norm32), norm32, x.float(), "tanh", 1e-3)
    assert fit32.lam.mean() > 0.05
    assert torch.equal(fit16.lam, fit32.lam)


def test_a_few_small_lambda_channels_keep_the_fast_form_and_are_exact():
    # Calibrated layers have a few channels with 0 < λ < 0.05 (0.025 × a back-off): the layer keeps the
    # logistic form and those channels are recomputed with tanh; many small λ take the series form.
    lam = torch.full((64,), 0.3)
    lam[[3, 17, 40]] = torch.tensor([0.02, 0.016, 0.0128])
    lam[5] = 0.0
    k = torch_rownorm.lam_constants(lam, "tanh", torch.float32)
    assert k.form == "logistic" and k.fix.tolist() == [3, 17, 40]
    assert torch_rownorm.lam_constants(torch.rand(64) * 0.04, "tanh", torch.float32).form == "series"
    z = torch.randn(300, 64) * 3
    z[0, 3] = 40.0
    for grad in (False, True):
        zz = z.clone().requires_grad_(grad)
        c = torch_rownorm.compress_fast(zz, k)
        want = torch.stack([ref.s(z[:, j].double(), float(lam[j]), "tanh") for j in range(64)], 1)
        assert (c.double() - want).abs().max() < 5e-6
        fixed = [3, 17, 40]  # tanh: a few ulps, not the logistic form's ~1e-5 at these λ
        assert ((c.double() - want)[:, fixed] / want[:, fixed].abs().clamp_min(1.0)).abs().max() < 1e-6
        assert torch.equal(c[:, 5].detach(), z[:, 5])  # λ = 0 is z exactly


def _fused_or_skip():
    if not cpu_fused.available():
        pytest.skip("no C compiler: the torch form serves")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_prefill_sized_threaded_matches_float64_reference(op, centered, dtype, monkeypatch):
    # Prefill-sized input (rows split across threads; 3 threads gives uneven splits), a hidden size
    # that is not a multiple of the C code's 256-element reduction blocks, |z| up to √H, λ up to 10.
    _fused_or_skip()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    n = 1000
    x = torch.randn(2, 91, n) * 2 + (1.5 if centered else 0.0)
    x[0, 4, 7] = 3000.0  # one channel dominates the row: |z| ≈ √n
    x[1, 3] = 0.0
    lam = torch.rand(n) * 10
    lam[::7] = 0.0
    lam[1::7] = torch.rand(lam[1::7].shape) * 0.05  # small λ: the polynomial side of the seams
    w = torch.randn(n) * 0.5 + 1.0
    b = torch.randn(n) * 0.3 if centered else None
    x, w, b = x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)
    assert x.numel() >= cpu_fused.THREADED_MIN_ELEMENTS
    calls = []
    real = cpu_fused.row_norm
    monkeypatch.setattr(cpu_fused, "row_norm", lambda *a: calls.append(1) or real(*a))
    got = cpu_rownorm.row_norm(x, (n,), w, b, lam, op, 1e-5, centered)
    assert calls and got.dtype == dtype
    want = ref.row_norm(x.double(), w.double(), None if b is None else b.double(), lam.double(), op, 1e-5, centered)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=2 ** -8, atol=1e-2)
    torch.testing.assert_close(got.double(), want, **tol)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("op", OPS)
def test_fused_compression_is_accurate_across_its_seams(op):
    # The C code computes s_λ from polynomial forms joined at fixed arguments (tanh: |u| = 0.625,
    # expm1: 0.5); a row holding a fine grid of z in [-30, 30] (padded with zeros, so its RMS is ~1
    # and z is the grid itself) for several λ checks each side of each seam.
    _fused_or_skip()
    grid = torch.cat([torch.linspace(-30, 30, 3001), torch.tensor([1e-30, -1e-30])])
    x = torch.cat([grid, torch.zeros(int(grid.square().sum()) - grid.numel())]).reshape(1, -1)
    assert x.square().mean().sqrt().item() == pytest.approx(1.0, rel=1e-3)
    for lam in (1e-3, 0.05, 0.3, 1.0, 3.0, 10.0):
        got = cpu_rownorm.row_norm(x, (x.shape[-1],), None, None, torch.tensor(lam), op, 1e-5, False)
        want = ref.row_norm(x.double(), None, None, lam, op, 1e-5, False)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def _count_calls(monkeypatch, name):
    calls = []
    real = getattr(cpu_fused, name)
    monkeypatch.setattr(cpu_fused, name, lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 12, 7, 5), (40, 12, 30, 30)])  # one thread; threaded (rows across threads)
def test_fused_group_norm_matches_float64_reference(op, per_channel, dtype, shape, monkeypatch):
    _fused_or_skip()
    calls = _count_calls(monkeypatch, "group_norm")
    x = torch.randn(shape) * 2 + 0.7
    x[0, 4, 1, 2] = 300.0  # a massive activation in one group
    x[1, :4] = 0.0  # a zero group
    lam = torch.rand(12) * 5 if per_channel else torch.tensor(0.6)
    if per_channel:
        lam[::4] = 0.0
    m = nn.GroupNorm(3, 12)
    with torch.no_grad():
        m.weight.normal_(1.0, 0.3)
        m.bias.normal_(0.0, 0.3)
    ib = ibnorm.from_module(m, op=op, lam=0.1).eval().to(dtype)
    ib.lam.data = lam
    with torch.no_grad():
        got = ib(x.to(dtype))
    assert calls and got.dtype == dtype
    want = ref.group_norm(x.to(dtype).double(), 3, ib.weight.double(), ib.bias.double(), lam.double(), op, 1e-5)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=2 ** -8, atol=1e-2)
    torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 6), (4, 6, 9), (2, 6, 5, 5), (64, 6, 20, 20)])
def test_fused_batch_norm_eval_matches_float64_reference(op, per_channel, dtype, shape, monkeypatch):
    _fused_or_skip()
    calls = _count_calls(monkeypatch, "channel_map")
    bn = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}[len(shape)](6)
    ib = ibnorm.from_module(bn, op=op, lam=0.1)
    with torch.no_grad():
        ib.weight.normal_(1.0, 0.3)
        ib.bias.normal_(0.0, 0.3)
        ib.running_mean.normal_(0.0, 0.5)
        ib.running_var.uniform_(0.5, 2.0)
        ib.running_c_mean.normal_(0.0, 0.1)
        ib.running_c_var.uniform_(0.5, 1.0)
        ib.running_z_var.uniform_(0.8, 1.2)
    lam = torch.rand(6) * 5 if per_channel else torch.tensor(0.6)
    if per_channel:
        lam[::3] = 0.0
    ib.lam.data = lam
    ib = ib.eval().to(dtype)
    x = (torch.randn(shape) * 2).to(dtype)
    with torch.no_grad():
        got = ib(x)
    assert calls and got.dtype == dtype
    bufs = [getattr(ib, n) for n in ("running_mean", "running_var", "running_c_mean", "running_c_var", "running_z_var")]
    want = ref.batch_norm_eval(x.double(), *bufs, ib.weight.double(), ib.bias.double(), lam.double(), op, 1e-5)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=2 ** -8, atol=1e-2)
    torch.testing.assert_close(got.double(), want, **tol)


def test_channel_groupings_keep_the_reference_where_the_fused_path_does_not_apply(monkeypatch):
    _fused_or_skip()
    group_calls, batch_calls = _count_calls(monkeypatch, "group_norm"), _count_calls(monkeypatch, "channel_map")
    gn = ibnorm.from_module(nn.GroupNorm(2, 4), lam=0.0).eval()
    bn = ibnorm.from_module(nn.BatchNorm2d(4), lam=0.5)
    x = torch.randn(3, 4, 5, 5)
    with torch.no_grad():
        # λ = 0 everywhere: the reference itself
        assert torch.equal(gn(x), IBF.ib_group_norm(x, 2, gn.weight, gn.bias, gn.lam, "tanh", 1e-5))
        bn.train()(x)  # batch statistics and running updates: the reference
    gn.lam.data = torch.tensor(0.5)
    y = gn(x.requires_grad_())  # a gradient is wanted: the reference
    y.sum().backward()
    assert not group_calls and not batch_calls


def test_torch_form_is_self_contained_and_shares_the_floor():
    # It is shipped next to converted models' modeling code, where ibnorm may not be installed.
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(torch_rownorm))
    roots = {n.names[0].name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert roots <= {"__future__", "dataclasses", "math", "typing", "torch"}
    assert not any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(tree))
    assert torch_rownorm.RESTANDARDIZE_FLOOR == IBF.RESTANDARDIZE_FLOOR


def test_fused_handles_strided_inputs_and_mixed_parameter_dtypes():
    _fused_or_skip()
    n = 48
    x = (torch.randn(n, 6, 5) * 2).transpose(0, 2)  # (5, 6, n), not contiguous
    w = (torch.randn(n) * 0.3 + 1).bfloat16()  # a bf16 γ with a float32 input
    lam = torch.rand(n) * 2
    got = cpu_rownorm.row_norm(x, (n,), w, None, lam, "tanh", 1e-5, False)
    want = ref.row_norm(x.double(), w.double(), None, lam.double(), "tanh", 1e-5, False)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    half = cpu_rownorm.row_norm(x.half(), (n,), w, None, lam, "tanh", 1e-5, False)  # float16: the torch form
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.double(), ref.row_norm(x.half().double(), w.double(), None, lam.double(), "tanh",
                                                           1e-5, False), rtol=2e-3, atol=2e-3)
    empty = cpu_rownorm.row_norm(torch.empty(0, n), (n,), w, None, lam, "tanh", 1e-5, False)
    assert empty.shape == (0, n)


def test_a_failed_build_leaves_the_torch_form_serving(monkeypatch, tmp_path):
    # No usable compiler (every flag set refused), an empty cache: available() is False, nothing
    # half-built is left in the cache, and the norms still give the reference's result.
    monkeypatch.setenv("IBNORM_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_fused, "_FLAGS", (["-not-a-flag"],))
    cpu_fused._library.cache_clear()
    try:
        assert not cpu_fused.available()
        assert list(tmp_path.iterdir()) == []
        x, w, b, lam = _case(True, "large")
        got = cpu_rownorm.row_norm(x, (H,), w, b, lam, "tanh", 1e-5, True)
        want = ref.row_norm(x.double(), w, b, lam.double(), "tanh", 1e-5, True)
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
        gn = ibnorm.from_module(nn.GroupNorm(2, 4), lam=0.5).eval()
        xg = torch.randn(2, 4, 3, 3)
        with torch.no_grad():
            torch.testing.assert_close(gn(xg).double(), ref.group_norm(xg.double(), 2, gn.weight.double(),
                                                                       gn.bias.double(), 0.5, "tanh", 1e-5),
                                       rtol=2e-5, atol=2e-5)
    finally:
        cpu_fused._library.cache_clear()


def test_a_damaged_cached_library_is_rebuilt(tmp_path):
    # A fresh process each time: dlopen would hand this one the library it already loaded.
    import os
    import subprocess
    import sys

    _fused_or_skip()
    env = dict(os.environ, IBNORM_CACHE=str(tmp_path), IBNORM_CPU_C="1")
    probe = [sys.executable, "-c", "from ibnorm.kernels import cpu_fused; print(cpu_fused.available())"]
    assert subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout.strip() == "True"
    (built,) = tmp_path.glob("*.so")
    built.write_bytes(b"not a shared library")
    assert subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout.strip() == "True"
    assert built.read_bytes()[:4] == b"\x7fELF"  # rebuilt in place, not silently given up
