"""Conversion of real pretrained models shipped by PyPI packages, and of tiny ones, end to end."""

import json

import pytest
import torch
from safetensors import safe_open

import ibnorm
from ibnorm.io.sources import load_source
from models import MINILM, SMOLLM2, needs_minilm, needs_smollm2, tiny_hf, tiny_timm


@pytest.fixture(scope="module")
def smollm2():
    return load_source(str(SMOLLM2))


@needs_smollm2
def test_smollm2_lam0_reproduces_source(smollm2):
    ids = smollm2.tokenizer("The reference manual describes the syntax and core semantics.", return_tensors="pt").input_ids
    with torch.no_grad():
        before = smollm2.model(input_ids=ids).logits
    import copy

    loaded = copy.copy(smollm2)
    loaded.model = copy.deepcopy(smollm2.model)
    res = ibnorm.convert_model(loaded, ibnorm.ConvertOptions(lam=0.0))
    assert len(res.layers) == 61 and all(r.new_class == "IBNormRMS" for r in res.layers)
    with torch.no_grad():
        after = loaded.model(input_ids=ids).logits
    assert (after - before).abs().max() <= 1e-4


@needs_smollm2
def test_smollm2_calibrated_round_trip(smollm2, tmp_path):
    out = tmp_path / "smol-ib"
    opts = ibnorm.ConvertOptions(calib="builtin:pydoc:train", calib_samples=4, seq_len=64, tolerance=0.003, budget=0.05)
    result, manifest = ibnorm.convert_checkpoint(str(SMOLLM2), out, opts)
    lam_means = [r.lam_mean for r in result.layers]
    assert max(lam_means) > 0.05  # calibration did compress
    assert manifest["calibration"]["mode"] == "data" and manifest["end_to_end"]["within_budget"]
    ids = torch.randint(0, 1000, (1, 20))
    with torch.no_grad():
        want = result.model(input_ids=ids).logits
    reloaded = ibnorm.load(out)
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    assert torch.equal(got, want)
    # tied embeddings are written once
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["ibnorm"]["op"] == "tanh" and "quantization_config" not in cfg


@needs_minilm
def test_minilm_layernorm_conversion(tmp_path):
    out = tmp_path / "minilm-ib"
    opts = ibnorm.ConvertOptions(calib="builtin:pydoc:train", calib_samples=4, seq_len=64, tolerance=0.003)
    result, manifest = ibnorm.convert_checkpoint(str(MINILM), out, opts, eval_data="builtin:pydoc:eval", eval_tokens=512)
    assert len(result.layers) == 13 and {r.new_class for r in result.layers} == {"IBLayerNorm"}
    assert manifest["evaluation"]["converted"] > 0.98  # embeddings agree with the source's
    assert (out / "tokenizer.json").exists() and (out / "1_Pooling" / "config.json").exists()
    reloaded = ibnorm.load(out)
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).last_hidden_state, result.model(input_ids=ids).last_hidden_state)


@pytest.mark.parametrize("kind", ["gpt2", "qwen3", "gemma"])
def test_tiny_hf_save_load_round_trip(kind, tmp_path):
    src_dir = tmp_path / "src"
    tiny_hf(kind).save_pretrained(src_dir)
    out = tmp_path / "out"
    result, _ = ibnorm.convert_checkpoint(str(src_dir), out, ibnorm.ConvertOptions(lam=0.3))
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(ibnorm.load(out)(input_ids=ids).logits, result.model(input_ids=ids).logits)


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_timm_random_weights_lam0_and_round_trip(name, tmp_path):
    from safetensors.torch import save_file

    model = tiny_timm(name)
    wfile = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(wfile))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        before = model(x)
    res0, _ = ibnorm.convert_checkpoint(f"timm:{name}", tmp_path / "lam0", ibnorm.ConvertOptions(lam=0.0), weights=str(wfile))
    # the checkpoint's classifier has 10 classes, timm's default 1000: weights must fit
    with torch.no_grad():
        assert (ibnorm.load(tmp_path / "lam0")(x) - before).abs().max() <= 1e-4
    res, manifest = ibnorm.convert_checkpoint(f"timm:{name}", tmp_path / "free", ibnorm.ConvertOptions(), weights=str(wfile))
    assert manifest["calibration"]["mode"] == "data-free"
    if name == "resnet18":  # batch norms get estimated step-4 statistics, not defaults
        assert not torch.equal(res.model.bn1.running_c_var, torch.ones_like(res.model.bn1.running_c_var))
    with torch.no_grad():
        torch.testing.assert_close(ibnorm.load(tmp_path / "free")(x), res.model(x))


def test_load_detects_manifest_mismatch(tmp_path):
    src_dir = tmp_path / "src"
    tiny_hf("llama").save_pretrained(src_dir)
    out = tmp_path / "out"
    ibnorm.convert_checkpoint(str(src_dir), out, ibnorm.ConvertOptions(lam=0.1))
    mf = out / "ibnorm_manifest.json"
    m = json.loads(mf.read_text())
    m["layers"][0]["lam_shape"] = [7]
    mf.write_text(json.dumps(m))
    with pytest.raises(ibnorm.errors.IBNormError, match="disagree"):
        ibnorm.load(out)
