"""Finding and replacing norms: every family is found, λ = 0 reproduces the source."""

import pytest
import torch
from torch import nn

import ibnorm
from ibnorm.io.sources import LoadedModel
from ibnorm.surgery import find_norms
from models import tiny_hf, tiny_timm

HF_EXPECTED = {  # family: (norm count, expected class name fragment, IB class)
    "llama": (5, "LlamaRMSNorm", "IBNormRMS"),
    "qwen3": (9, "Qwen3RMSNorm", "IBNormRMS"),  # includes per-head q_norm / k_norm
    "gemma": (5, "GemmaRMSNorm", "IBNormRMS"),
    "gpt2": (5, "LayerNorm", "IBLayerNorm"),
}


def _convert_lam0(loaded: LoadedModel) -> ibnorm.ConversionResult:
    return ibnorm.convert_model(loaded, ibnorm.ConvertOptions(lam=0.0))


@pytest.mark.parametrize("kind", list(HF_EXPECTED))
def test_hf_families_found_and_lam0_exact(kind):
    model = tiny_hf(kind)
    count, cls, ib_cls = HF_EXPECTED[kind]
    sites, skipped = find_norms(model)
    assert len(sites) == count and not skipped
    assert all(cls in s.spec.source_class for s in sites)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    res = _convert_lam0(LoadedModel(model, "hf", "causal-lm", kind, kind))
    assert all(r.new_class == ib_cls for r in res.layers)
    assert not any(type(m).__name__ == cls for m in model.modules())  # no source norm left
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert (after - before).abs().max() <= 1e-4


def test_gemma_offset_weight_is_folded():
    model = tiny_hf("gemma")
    site = find_norms(model)[0][0]
    assert "Gemma-style" in site.spec.note
    torch.testing.assert_close(site.spec.weight, 1.0 + site.module.weight.float())


@pytest.mark.parametrize("name,count,ib_cls", [
    ("resnet18", 20, "IBBatchNorm2d"),
    ("vit_tiny_patch16_224", 25, "IBLayerNorm"),
    ("convnext_atto", 17, "IBLayerNorm2d"),
    ("efficientnet_b0", 49, "IBBatchNorm2d"),  # timm BatchNormAct2d: activation must survive
])
def test_timm_lam0_exact(name, count, ib_cls):
    model = tiny_timm(name)
    x = torch.randn(2, 3, 224, 224) if "vit" in name else torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        before = model(x)
    res = _convert_lam0(LoadedModel(model, "timm", "image-classifier", name, f"timm:{name}", info={"architecture": name}))
    assert len(res.layers) == count and {r.new_class for r in res.layers} >= {ib_cls}
    with torch.no_grad():
        after = model(x)
    assert (after - before).abs().max() <= 1e-4


def test_bn_act_keeps_activation():
    model = tiny_timm("efficientnet_b0")
    bn = model.bn1
    act_type = type(bn.act)
    _convert_lam0(LoadedModel(model, "timm", "image-classifier", "e", "e"))
    assert isinstance(model.bn1, ibnorm.IBBatchNorm2d) and isinstance(model.bn1.act, act_type)


def test_only_exclude_and_frozen_bn_skipped():
    class Frozen(nn.Module):  # torchvision/timm FrozenBatchNorm2d shape
        def __init__(self):
            super().__init__()
            for n in ("weight", "bias", "running_mean", "running_var"):
                self.register_buffer(n, torch.ones(4))
            self.eps = 1e-5

        def forward(self, x):
            return x

    Frozen.__name__ = "FrozenBatchNorm2d"
    model = nn.Sequential(nn.LayerNorm(4), nn.LayerNorm(4), Frozen(), nn.BatchNorm1d(4))
    sites, skipped = find_norms(model, exclude=["1"])
    assert [s.name for s in sites] == ["0", "3"]
    reasons = {s.name: s.reason for s in skipped}
    assert "excluded" in reasons["1"] and "frozen" in reasons["2"]
    sites, _ = find_norms(model, only=["3"])
    assert [s.name for s in sites] == ["3"]


def test_shared_norm_stays_shared():
    ln = nn.LayerNorm(4)
    model = nn.Sequential(ln, nn.Linear(4, 4), ln)
    _convert_lam0(LoadedModel(model, "hf", "encoder", "x", "x"))
    assert model[0] is model[2] and isinstance(model[0], ibnorm.IBLayerNorm)
