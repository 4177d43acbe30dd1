"""Modeling code of an ibnorm-converted transformers model (self-contained: torch + transformers only).

Shipped inside every converted model directory and registered by ``import ibnorm``.  A model class
``IBNorm<Base>`` (``IBNormLlamaForCausalLM``, ``IBNormBertModel``, …) is the base architecture with
the normalization layers named in ``config.ibnorm["layers"]`` replaced by :class:`IBNorm`, a pure-torch
IBNorm (docs/math.md of the ibnorm project):

1. d = x − mean_G(x) (rms: d = x);  2. z = d / sqrt(mean_G(d²) + ε);  3. c = s_λ(z) elementwise;
4. ĉ = (c − mean_G(c − z)) · sqrt(max(var_G z, δ) / max(var_G c, δ));  5. y = γ ⊙ ĉ + β.

Statistics are computed in float32 (float64 for float64 inputs) and the result has the input dtype.
γ is the effective multiplier (Gemma's ``1 + w`` was folded in by the converter).

The rms and layer groupings run ibnorm's few-op torch form (``torch_rownorm.py``, shipped beside
this file): about a dozen torch ops per call instead of the exact form's forty, equal to it to
float32 rounding, and the exact form bit for bit where λ is 0 everywhere.  The group grouping, and
a positive λ below 1e-20, take the exact form below.

Serving engines (vLLM and SGLang through their Transformers backends) build the *base* model
(``AutoModel.from_config`` on the meta device), load every checkpoint tensor as a parameter, swap
modules whose class name ends in "RMSNorm" and compile with ``torch.compile``.  So: layer names in
the config resolve in the base model as in the head model; λ is a frozen parameter, not a buffer;
the layer class is ``IBNorm``; under compilation and export the forward is the exact form, which
has no data-dependent branch; and FX tracing sees one opaque call (no RMSNorm pattern to match).
tests/test_serving_contract.py states and checks this.
"""

from __future__ import annotations

import torch
import transformers
from torch import Tensor, nn

from .configuration_ibnorm import base_model_type, config_class_for, write_code_files

try:  # shipped in a model directory: the file sits next to this one
    from .torch_rownorm import row_norm as fast_row_norm
except ImportError:  # inside the ibnorm package
    from ibnorm.kernels.torch_rownorm import row_norm as fast_row_norm

# Floor under the variances of step 4: guards constant and zero groups.
RESTANDARDIZE_FLOOR = 1e-12
# Below this argument the ratios use a truncated series.
SERIES_CUTOFF = 1e-4


def _ratio(op: str, lam: Tensor, a: Tensor) -> Tensor:
    """r with s_λ(z) = z · r(|z|), evaluated exactly as ibnorm's reference does.

    The direct forms (tanh(λz)/λ, …) take fewer ops but differ by an ulp per layer, and that
    grows through a deep network (1e-3 in SmolLM2's logits); this form matches the reference
    bit for bit, so the exported model computes what ``ibnorm.load`` computes.
    """
    if op == "power":  # ((1 + a)^p − 1) / (p·a), p = 1/(1+λ)
        p = 1.0 / (1.0 + lam)
        u, series = a, 1.0 + (p - 1.0) * a / 2.0 + (p - 1.0) * (p - 2.0) * a * a / 6.0
    else:
        u = lam * a
        if op == "tanh":  # tanh(λa) / (λa)
            series = 1.0 - u * u / 3.0
        elif op == "log":  # log(1 + λa) / (λa)
            series = 1.0 - u / 2.0 + u * u / 3.0
        else:
            raise ValueError(f"unknown IBNorm compression op {op!r}")
    small = u < SERIES_CUTOFF
    v = torch.where(small, torch.ones_like(u), u)  # keeps the unused branch NaN-free
    log1p, expm1 = (_log1p_plain, _expm1_plain) if _traced() else (torch.log1p, torch.expm1)
    if op == "tanh":
        exact = torch.tanh(v) / v
    elif op == "log":
        exact = log1p(v) / v
    else:
        exact = expm1(p * log1p(v)) / (p * v)
    return torch.where(small, series, exact)


def _traced() -> bool:
    """Under torch.compile, torch.export (ONNX) or TorchScript tracing."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _log1p_plain(v: Tensor) -> Tensor:
    # log1p from log and exp only, accurate to a few ulps (Goldberg's form): ONNX has no Log1p, and an
    # exporter's Log(1 + v) loses 6e-8/v relative accuracy.  v ≥ SERIES_CUTOFF here, so w > 1.
    w = 1.0 + v
    return torch.log(w) * (v / (w - 1.0))


def _expm1_plain(y: Tensor) -> Tensor:
    # expm1 likewise (Kahan's form); y > 0 here.
    u = torch.exp(y)
    return torch.where(u == 1.0, y, (u - 1.0) * (y / torch.log(u)))


def _compress(z: Tensor, lam: Tensor, op: str) -> Tensor:
    """s_λ(z) elementwise; channels with λ = 0 pass z through unchanged (bit for bit)."""
    is_zero = lam == 0
    lam_safe = torch.where(is_zero, torch.ones_like(lam), lam)
    return torch.where(is_zero, z, z * _ratio(op, lam_safe, z.abs()))


class IBNorm(nn.Module):
    """One IBNorm layer described by a ``config.ibnorm["layers"]`` entry.

    Groupings: ``rms`` and ``layer`` over the trailing ``normalized_shape`` (or over dim 1 when
    ``channel_dim`` is 1), and ``group``.  λ is fixed (scalar or one value per channel): a parameter
    that does not require grad, because serving engines load checkpoint tensors into parameters only.
    """

    def __init__(self, layer: dict) -> None:
        super().__init__()
        self.grouping = layer["grouping"]
        if self.grouping not in ("rms", "layer", "group"):
            raise ValueError(f"{layer['name']}: IBNorm grouping {self.grouping!r} is not supported by this code")
        self.op = layer["op"]
        self.eps = float(layer["eps"])
        self.normalized_shape = tuple(layer["normalized_shape"])
        self.channel_dim = int(layer.get("channel_dim", -1))
        self.num_groups = layer.get("num_groups")
        shape = self.normalized_shape
        self.weight = nn.Parameter(torch.ones(shape)) if layer.get("weight", True) else None
        self.bias = nn.Parameter(torch.zeros(shape)) if layer.get("bias", False) else None
        self.lam = nn.Parameter(torch.zeros(tuple(layer["lam_shape"]), dtype=torch.float32), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return ib_norm(x, self.weight, self.bias, self.lam, self.grouping, self.op, self.eps, self.normalized_shape,
                       self.channel_dim, self.num_groups)

    def extra_repr(self) -> str:
        lam = self.lam.float()
        return (f"{self.grouping}, {self.normalized_shape}, eps={self.eps}, op={self.op}, "
                f"lam_mean={lam.mean().item() if lam.numel() and not lam.is_meta else float('nan'):.4g}")


@torch.fx.wrap  # one opaque call to FX tracers: pattern matchers (vLLM's norm fusers) find no RMSNorm inside
def ib_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, lam: Tensor, grouping: str, op: str, eps: float,
            normalized_shape: tuple, channel_dim: int = -1, num_groups: int | None = None) -> Tensor:
    """IBNorm of ``x`` (see the module docstring); the result has the input dtype."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    if grouping == "group":
        return _group(x, weight, bias, lam, op, eps, num_groups, ct)
    centered = grouping == "layer"
    xl = x if channel_dim == -1 else x.movedim(1, -1)
    # The few-op form branches on λ's values and caches by tensor identity: eager only.
    y = None if _traced() else fast_row_norm(xl, normalized_shape, weight, bias, lam, op, eps, centered)
    if y is None:
        xf = xl.to(ct)
        dims = tuple(range(-len(normalized_shape), 0))
        d = xf - xf.mean(dims, keepdim=True) if centered else xf
        z = d * torch.rsqrt(d.square().mean(dims, keepdim=True) + eps)
        c = _compress(z, lam.detach().to(ct), op)  # λ is fixed whatever its requires_grad (loading resets it)
        y = _affine(_restandardize(z, c, dims, centered), weight, bias, ct).to(x.dtype)
    return y if channel_dim == -1 else y.movedim(-1, 1)


def _restandardize(z: Tensor, c: Tensor, dims: tuple, centered: bool) -> Tensor:
    # var_c and var_z are computed by the same operations, so at λ = 0 (c == z) the ratio is exactly 1.
    if centered:
        mu_c = (c - z).mean(dims, keepdim=True)
        var_c = (c - c.mean(dims, keepdim=True)).square().mean(dims, keepdim=True)
        var_z = (z - z.mean(dims, keepdim=True)).square().mean(dims, keepdim=True)
        c = c - mu_c
    else:
        var_c = c.square().mean(dims, keepdim=True)
        var_z = z.square().mean(dims, keepdim=True)
    return c * (torch.sqrt(var_z.clamp_min(RESTANDARDIZE_FLOOR)) / torch.sqrt(var_c.clamp_min(RESTANDARDIZE_FLOOR)))


def _group(x: Tensor, weight: Tensor | None, bias: Tensor | None, lam: Tensor, op: str, eps: float, num_groups: int,
           ct: torch.dtype) -> Tensor:
    n = x.shape[0]
    view = (1, -1) + (1,) * (x.dim() - 2)
    g = x.to(ct).reshape(n, num_groups, -1)
    d = g - g.mean(-1, keepdim=True)
    z = (d * torch.rsqrt(d.square().mean(-1, keepdim=True) + eps)).reshape(x.shape)
    lam = lam.detach().to(ct)
    c = _compress(z, lam.reshape(view) if lam.dim() == 1 else lam, op)
    y = _restandardize(z.reshape(n, num_groups, -1), c.reshape(n, num_groups, -1), (-1,), True)
    return _affine(y.reshape(x.shape), weight, bias, ct, view).to(x.dtype)


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None, ct: torch.dtype, view: tuple | None = None) -> Tensor:
    for p, combine in ((weight, torch.mul), (bias, torch.add)):
        if p is not None:
            p = p.to(ct)
            y = combine(y, p.reshape(view) if view is not None else p)
    return y


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str] | None:
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        return None
    return (parent, child) if hasattr(parent, child) else None


def swap_in_ibnorm(model: nn.Module, layers: list) -> None:
    """Replace each named module by an :class:`IBNorm` built from its entry.

    Names are those of the converted class (``model.layers.0.input_layernorm`` for a causal LM); the base
    model (what serving engines build) lacks the ``base_model_prefix``, a head model over a converted
    base model has it in addition."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    for layer in layers:
        name = layer["name"]
        other = name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else f"{prefix}.{name}" if prefix else name
        found = _owner(model, name) or _owner(model, other)
        if found is None:
            raise ValueError(f"config names IBNorm layer {name!r}, which {type(model).__name__} does not have")
        setattr(found[0], found[1], IBNorm(layer))


def _post_init(self) -> None:
    # The base __init__ ends with post_init: swap the norms first so every later step (weight
    # init, tied keys, device maps) sees the IBNorm modules.
    swap_in_ibnorm(self, self.config.ibnorm["layers"])
    self._ibnorm_base_post_init()


def _init_weights(self, module: nn.Module) -> None:
    if isinstance(module, IBNorm):
        from transformers import initialization as init

        if module.weight is not None:
            init.ones_(module.weight)
        if module.bias is not None:
            init.zeros_(module.bias)
        init.zeros_(module.lam)  # λ = 0: the base norm; converted checkpoints carry their λ
        return
    self._ibnorm_base_init_weights(module)


def _save_pretrained(self, save_directory, *args, **kwargs):
    out = self._ibnorm_base_save_pretrained(save_directory, *args, **kwargs)
    write_code_files(save_directory)
    return out


_MODEL_CLASSES: dict = {}


def model_class_for(base_class_name: str) -> type:
    """``IBNorm<base_class_name>``: the base transformers class with IBNorm layers."""
    cls = _MODEL_CLASSES.get(base_class_name)
    if cls is None:
        base = getattr(transformers, base_class_name)
        cls = type(f"IBNorm{base_class_name}", (base,), {
            "config_class": config_class_for(base.config_class.model_type),
            "__module__": __name__,
            "_ibnorm_base_post_init": base.post_init,
            "post_init": _post_init,
            "_ibnorm_base_init_weights": base._init_weights,
            "_init_weights": _init_weights,
            "_ibnorm_base_save_pretrained": base.save_pretrained,
            "save_pretrained": _save_pretrained,
        })
        _MODEL_CLASSES[base_class_name] = cls
    return cls


__all__ = ["IBNorm", "ib_norm", "swap_in_ibnorm", "model_class_for", "base_model_type"]


def __getattr__(name: str):
    # ``auto_map`` names a class such as ``IBNormLlamaForCausalLM``; build it on first access.
    if name.startswith("IBNorm") and hasattr(transformers, name[len("IBNorm"):]):
        return model_class_for(name[len("IBNorm"):])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
