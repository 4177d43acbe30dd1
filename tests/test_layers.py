import pytest
import torch
from torch import nn

import ibnorm
import reference64 as ref
from ibnorm import functional as IBF

OPS = ["tanh", "log", "power"]


def _randomize(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name in ("weight", "bias"):
                p.normal_(mean=1.0 if name == "weight" else 0.0, std=0.5)
    return m


# ---------------------------------------------------------------- forward against float64 reference


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
def test_row_forward_matches_reference(op, centered, per_channel):
    h = 37
    x = torch.randn(3, 5, h, dtype=torch.float64) * 2 + 0.5
    x[0, 0, 3] = 25.0  # one massive activation
    w, b = torch.randn(h, dtype=torch.float64), torch.randn(h, dtype=torch.float64)
    lam = torch.rand(h, dtype=torch.float64) * 2 if per_channel else 0.8
    if per_channel:
        lam[::4] = 0.0
    got = IBF.ib_row_norm(x, (h,), w, b if centered else None, lam, op, 1e-5, centered)
    want = ref.row_norm(x, w, b if centered else None, lam, op, 1e-5, centered)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_group_forward_matches_reference(op, per_channel):
    x = torch.randn(4, 6, 5, 3, dtype=torch.float64) * 3
    w, b = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    lam = torch.tensor([0.0, 0.5, 1.0, 2.0, 0.1, 3.0], dtype=torch.float64) if per_channel else 1.5
    got = IBF.ib_group_norm(x, 3, w, b, lam, op, 1e-5)
    torch.testing.assert_close(got, ref.group_norm(x, 3, w, b, lam, op, 1e-5), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(16, 4), (8, 4, 7), (6, 4, 3, 5)])
def test_batch_forward_train_and_eval_match_reference(op, shape):
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    m = ibnorm.IBBatchNorm(4, op=op, lam=torch.tensor([0.0, 0.3, 1.0, 4.0]), momentum=0.25).double()
    _randomize(m)
    m.train()
    y = m(x)
    want, z, c = ref.batch_norm_train(x, m.weight, m.bias, m.lam, op, m.eps)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    # running estimates: one momentum step from the defaults
    dims = [0] + list(range(2, x.dim()))
    torch.testing.assert_close(m.running_c_mean, 0.25 * (c - z).mean(dims), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.running_c_var, 0.75 + 0.25 * c.var(dims, unbiased=False), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.running_z_var, 0.75 + 0.25 * z.var(dims, unbiased=False), rtol=1e-10, atol=1e-12)
    m.eval()
    y_eval = m(x)
    want_eval = ref.batch_norm_eval(
        x, m.running_mean, m.running_var, m.running_c_mean, m.running_c_var, m.running_z_var,
        m.weight, m.bias, m.lam, op, m.eps,
    )
    torch.testing.assert_close(y_eval, want_eval, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- λ = 0 equals torch's own norms


def _lambda0_pairs():
    yield nn.RMSNorm(48, eps=1e-6), (torch.randn(4, 9, 48) * 3,)
    yield nn.RMSNorm(48), (torch.randn(4, 9, 48),)  # eps=None
    yield nn.LayerNorm(48), (torch.randn(4, 9, 48) * 3 + 2,)
    yield nn.LayerNorm((6, 8)), (torch.randn(5, 6, 8),)
    yield nn.LayerNorm(48, bias=False), (torch.randn(7, 48),)
    yield nn.BatchNorm1d(12), (torch.randn(16, 12) * 2 + 1,)
    yield nn.BatchNorm1d(12, momentum=None), (torch.randn(16, 12, 5) * 2 + 1,)
    yield nn.BatchNorm2d(12), (torch.randn(8, 12, 6, 6) * 2 + 1,)
    yield nn.BatchNorm2d(12, track_running_stats=False), (torch.randn(8, 12, 6, 6),)
    yield nn.GroupNorm(3, 12), (torch.randn(4, 12, 5, 5) * 4,)
    yield nn.GroupNorm(1, 12, affine=False), (torch.randn(4, 12, 10),)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case", range(11))
def test_lambda_zero_equals_torch_norm_train_and_eval(op, case):
    src, (x,) = list(_lambda0_pairs())[case]
    _randomize(src)
    ib = ibnorm.from_module(src, op=op, lam=0.0)
    for step in range(3):  # several steps so running statistics evolve
        src.train(), ib.train()
        torch.testing.assert_close(ib(x * (step + 1)), src(x * (step + 1)), rtol=1e-5, atol=2e-6)
    if isinstance(src, nn.modules.batchnorm._BatchNorm) and src.track_running_stats:
        assert torch.equal(ib.running_mean, src.running_mean)
        assert torch.equal(ib.running_var, src.running_var)
        assert int(ib.num_batches_tracked) == int(src.num_batches_tracked) == 3
        # at λ = 0 the step-4 estimates make step 4 exactly the identity
        assert torch.equal(ib.running_c_var, ib.running_z_var) and not ib.running_c_mean.any()
    src.eval(), ib.eval()
    torch.testing.assert_close(ib(x), src(x), rtol=1e-5, atol=2e-6)


def test_lambda_zero_rmsnorm_is_bit_exact_in_float64():
    src = _randomize(nn.RMSNorm(64, eps=1e-6).double())
    x = torch.randn(10, 64, dtype=torch.float64)
    assert (ibnorm.from_module(src)(x) - src(x)).abs().max() < 1e-15


def test_momentum_none_is_cumulative_average():
    src = nn.BatchNorm1d(5, momentum=None)
    ib = ibnorm.from_module(src, lam=0.7)
    xs = [torch.randn(32, 5) * (i + 1) + i for i in range(4)]
    zvars = []
    for x in xs:
        ib(x), src(x)
        zvars.append(((x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)).var(0, unbiased=False))
    torch.testing.assert_close(ib.running_mean, src.running_mean)
    torch.testing.assert_close(ib.running_var, src.running_var)
    torch.testing.assert_close(ib.running_z_var, torch.stack(zvars).mean(0), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- gradcheck for every variant × op


def _modules_for_gradcheck(op):
    # λ > 0: central differences at λ = 0 would straddle the boundary (tested one-sided elsewhere)
    lam_row = torch.tensor([0.05, 0.2, 0.5, 1.0, 2.0, 0.4, 0.3], dtype=torch.float64)
    lam_ch = torch.tensor([0.3, 0.05, 1.2, 2.5], dtype=torch.float64)
    yield "rms", ibnorm.IBRMSNorm(7, op=op, lam=0.6, learnable_lam=True), (3, 7)
    yield "rms-per-channel", ibnorm.IBRMSNorm(7, op=op, lam=lam_row, learnable_lam=True), (3, 7)
    yield "layer", ibnorm.IBLayerNorm(7, op=op, lam=0.6, learnable_lam=True), (3, 7)
    yield "layer-per-channel", ibnorm.IBLayerNorm(7, op=op, lam=lam_row, learnable_lam=True), (3, 7)
    yield "batch", ibnorm.IBBatchNorm2d(4, op=op, lam=lam_ch, learnable_lam=True), (5, 4, 2, 2)
    yield "batch-eval", ibnorm.IBBatchNorm1d(4, op=op, lam=0.9, learnable_lam=True).eval(), (6, 4)
    yield "group", ibnorm.IBGroupNorm(2, 4, op=op, lam=lam_ch, learnable_lam=True), (3, 4, 5)


@pytest.mark.parametrize("op", OPS)
def test_gradcheck_every_variant(op):
    for name, m, shape in _modules_for_gradcheck(op):
        m = _randomize(m.double())
        x = (torch.randn(shape, dtype=torch.float64) * 2).requires_grad_()
        names = [n for n, p in m.named_parameters()]

        def fn(x, *ps):
            return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

        ps = [dict(m.named_parameters())[n].detach().clone().requires_grad_() for n in names]
        if isinstance(m, ibnorm.IBBatchNorm) and m.training:
            m.track_running_stats = False  # keep buffers fixed across gradcheck's evaluations
            m.running_mean = m.running_var = m.running_c_mean = m.running_c_var = m.running_z_var = None
        assert torch.autograd.gradcheck(fn, (x, *ps), atol=1e-6), name


@pytest.mark.parametrize("op", OPS)
def test_lambda_zero_gradients_finite_and_lam_moves(op):
    m = ibnorm.IBRMSNorm(16, op=op, lam=0.0, learnable_lam=True)
    x = torch.randn(4, 16) * 5
    x[0] = 0.0  # zero row
    x[1] = 3.0  # constant row
    m(x).pow(3).sum().backward()
    assert torch.isfinite(m.lam.grad) and torch.isfinite(m.weight.grad).all()
    if op != "tanh":
        assert m.lam.grad.item() != 0.0


def test_learnable_lambda_projection():
    m = ibnorm.IBLayerNorm(8, lam=0.1, learnable_lam=True, op="log")
    with torch.no_grad():
        m.lam.fill_(-0.5)
    assert m.effective_lam.item() == 0.0
    ibnorm.project_lambdas(m)
    assert m.lam.item() == 0.0


# ---------------------------------------------------------------- robustness and dtypes


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(op, dtype):
    for m in (ibnorm.IBRMSNorm(64, op=op, lam=10.0), ibnorm.IBLayerNorm(64, op=op, lam=10.0)):
        m = m.to(dtype)
        x = torch.randn(6, 64) * 1e4 if dtype == torch.bfloat16 else torch.randn(6, 64) * 6e3
        x[1] = 0.0
        x[2] = 7.0
        x = x.to(dtype).requires_grad_()
        y = m(x)
        assert y.dtype == dtype and torch.isfinite(y).all()
        y.float().sum().backward()
        assert torch.isfinite(x.grad).all()
        want = ref.row_norm(x.detach(), m.weight.detach(), None, 10.0, op, m.eps, isinstance(m, ibnorm.IBLayerNorm))
        torch.testing.assert_close(y.double(), want, rtol=2e-2, atol=2e-2)
    for m in (ibnorm.IBBatchNorm2d(3, op=op, lam=10.0), ibnorm.IBGroupNorm(1, 3, op=op, lam=10.0)):
        m = m.to(dtype)
        x = (torch.randn(4, 3, 5, 5) * 1e3).to(dtype)
        x[:, 0] = 2.0
        assert torch.isfinite(m(x)).all() and m(x).dtype == dtype


def test_state_dict_round_trip_every_class():
    lam = torch.linspace(0, 1, 10)
    for make in (
        lambda: ibnorm.IBRMSNorm(10, lam=lam, op="log"),
        lambda: ibnorm.IBLayerNorm(10, lam=0.4, learnable_lam=True, op="power"),
        lambda: ibnorm.IBBatchNorm1d(10, lam=lam),
        lambda: ibnorm.IBGroupNorm(5, 10, lam=lam),
    ):
        a = _randomize(make())
        x = torch.randn(8, 10) if not isinstance(a, ibnorm.IBGroupNorm) else torch.randn(4, 10, 3)
        a.train()(x)
        b = make()
        b.load_state_dict(a.state_dict())
        a.eval(), b.eval()
        assert torch.equal(a(x), b(x))


def test_torch_compile_matches_eager():
    for m, x in (
        (ibnorm.IBRMSNorm(32, lam=torch.rand(32), op="log"), torch.randn(4, 32)),
        (ibnorm.IBBatchNorm2d(3, lam=0.5, op="power").eval(), torch.randn(2, 3, 4, 4)),
    ):
        _randomize(m)
        compiled = torch.compile(m, backend="inductor")
        torch.testing.assert_close(compiled(x), m(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- from_module


def test_from_module_copies_everything():
    src = _randomize(nn.BatchNorm2d(6, eps=1e-3, momentum=0.05))
    src(torch.randn(4, 6, 3, 3))
    src.eval()
    ib = ibnorm.from_module(src, op="log", lam=0.2)
    assert isinstance(ib, ibnorm.IBBatchNorm2d) and not ib.training
    assert ib.eps == 1e-3 and ib.momentum == 0.05
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(ib, name), getattr(src, name))


def test_from_module_dtype_and_variant_switch():
    src = _randomize(nn.LayerNorm(16)).to(torch.bfloat16)
    ib = ibnorm.from_module(src, grouping="rms")
    assert isinstance(ib, ibnorm.IBRMSNorm) and ib.weight.dtype == torch.bfloat16
    assert torch.equal(ib.bias, src.bias)  # β kept where the base norm has one


def test_from_module_rejects_unsupported():
    with pytest.raises(TypeError, match="Linear"):
        ibnorm.from_module(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="cannot replace a batch norm"):
        ibnorm.from_module(nn.BatchNorm1d(3), grouping="layer")
    with pytest.raises(ValueError, match="unknown grouping"):
        ibnorm.from_module(nn.LayerNorm(3), grouping="instance")
    with pytest.raises(ValueError, match="unknown compression op"):
        ibnorm.from_module(nn.LayerNorm(3), op="cubic")
    with pytest.raises(ValueError, match="λ must be"):
        ibnorm.from_module(nn.LayerNorm(3), lam=-1.0)
