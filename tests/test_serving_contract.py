"""The serving contract: what vLLM and SGLang need to run a converted model through their Transformers backends.

Neither engine runs here (no GPU build in CI); this module checks, on CPU, every requirement their
documentation and code state, for the classes a serving process gets both ways: from the
directory's ``auto_map`` with ibnorm not importable (``trust_remote_code``), and from ibnorm's
registration with transformers' Auto classes (a process that imports ibnorm).

Requirements, with their sources:

1. ``config.json`` has ``auto_map`` entries for ``AutoConfig`` and ``AutoModel`` (and
   ``AutoModelForCausalLM``) — vLLM, docs/models/supported_models.md, "Transformers" / "Custom models":
   "config.json must contain auto_map.AutoModel"; SGLang, docs/supported_models/transformers_fallback.md
   ("Remote code": any model usable with ``trust_remote_code=True`` that implements attention as below), and
   its python/sglang/srt/models/transformers.py resolves the class from ``auto_map["AutoModel"]`` or
   ``["AutoModelForCausalLM"]`` to read ``_supports_attention_backend``.
2. Customisation is in the base model — vLLM, same page, "Writing custom models": "Customisation should
   be done in the base model (e.g. in MyModel, not MyModelForCausalLM)". Both engines build
   ``AutoModel.from_config(config, trust_remote_code=True)`` (the base model, on the meta device, params
   materialized later: SGLang ``TransformersBase.__init__``), so the IBNorm layers must be swapped in there,
   with no data-dependent work in ``__init__`` (transformers issue 43957).
3. ``kwargs`` are passed down from the model to the attention module, and 4. attention is called through
   ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` — vLLM "Writing custom models" items 1-2,
   SGLang "Remote code" (``def forward(self, hidden_states, **kwargs): # <- kwargs are required``). Checked
   by registering a counting function with transformers' ``AttentionInterface`` and passing an extra
   keyword argument to the model: every layer's attention must receive it, and the logits must equal
   sdpa's and eager's.
5. ``_supports_attention_backend = True`` on the model class — vLLM item 3; SGLang raises without it.
6. No IBNorm module class has a name ending in "RMSNorm": SGLang's backend swaps every such module for its
   fused RMSNorm (``recursive_replace``: ``child_module.__class__.__name__.endswith("RMSNorm")``), and
   vLLM's current main matches RMSNorm by the shape of the computation in an FX trace of ``forward``
   (``models/transformers/fusers/rms_norm.py``, which accepts a partial trace): either would drop λ
   silently. ibnorm's own layer classes follow suit (``IBNormRMS``, formerly ``IBRMSNorm``), and the
   shipped ``IBNorm.forward`` is one opaque call to FX.
7. Every checkpoint tensor is a parameter: the engines' ``AutoWeightsLoader`` fills parameters (and
   BatchNorm statistics) only, so λ is a parameter that does not require grad, not a buffer.
8. The IBNorm forward compiles with ``torch.compile(fullgraph=True)`` (both engines compile the model).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ibnorm
from models import randomize_lambda, tiny_hf
from serving_client import contract_facts

HERE = Path(__file__).resolve().parent
IDS = [[3, 17, 42, 99, 5, 64, 7, 120], [1, 2, 3, 4, 5, 6, 7, 8]]
KINDS = {"llama": "tanh", "qwen3": "log"}  # Qwen3 also normalizes q and k inside attention


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("serving")
    out = {"root": root}
    for i, (kind, op) in enumerate(KINDS.items()):
        src = root / f"src_{kind}"
        tiny_hf(kind).save_pretrained(src)
        out[kind] = root / f"conv_{kind}"
        ibnorm.convert_checkpoint(str(src), out[kind], ibnorm.ConvertOptions(lam=0.3, op=op))
        randomize_lambda(out[kind], seed=i)
    return out


@pytest.fixture(scope="module")
def facts(dirs) -> dict:
    """{(kind, "remote" | "registered"): (facts, tensors)}."""
    from safetensors.torch import load_file

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(dirs["root"] / "hf_modules"))
    out = {}
    for kind in KINDS:
        report = dirs["root"] / f"remote_{kind}.json"
        proc = subprocess.run([sys.executable, str(HERE / "serving_client.py"), str(dirs[kind]), str(report), json.dumps(IDS)],
                              cwd=dirs["root"], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[kind, "remote"] = (json.loads(report.read_text()), load_file(report.with_suffix(".safetensors")))
        out[kind, "registered"] = contract_facts(dirs[kind], False, IDS)
    return out


WAYS = [(kind, way) for kind in KINDS for way in ("remote", "registered")]


@pytest.mark.parametrize("kind,way", WAYS)
def test_auto_map_and_attention_backend_flag(facts, kind, way):
    classes = facts[kind, way][0]["classes"]
    assert {"AutoConfig", "AutoModel", "AutoModelForCausalLM"} <= set(classes["auto_map"])
    for key in ("AutoModel", "AutoModelForCausalLM"):
        assert classes[key]["class"].startswith("IBNorm")
        assert classes[key]["module"].endswith("modeling_ibnorm")
        assert classes[key]["supports_attention_backend"] is True
    if way == "remote":  # the directory's copy, not ibnorm's
        assert not classes["AutoModel"]["module"].startswith("ibnorm.")


@pytest.mark.parametrize("kind,way", WAYS)
def test_base_model_builds_on_meta_with_ibnorm_layers(facts, dirs, kind, way):
    base = facts[kind, way][0]["base_model"]
    assert base["meta_build"] == "ok"
    config = json.loads((dirs[kind] / "config.json").read_text())
    assert len(base["layers"]) == len(config["ibnorm"]["layers"]) > 0
    assert set(base["layers"].values()) == {"IBNorm"}
    assert base["named_rmsnorm"] == []  # nothing for SGLang's swap (every norm of these models is converted)
    assert base["not_parameters"] == []  # λ included: the engines' weight loaders will fill it


@pytest.mark.parametrize("kind,way", WAYS)
def test_custom_attention_function_receives_kwargs_and_changes_nothing(facts, dirs, kind, way):
    attention = facts[kind, way][0]["attention"]
    assert attention["calls"] == attention["layers"] > 0
    assert attention["marker_seen"] == attention["calls"]  # the extra kwarg reached every attention call
    assert attention["vs_sdpa"] <= 1e-5 and attention["vs_eager"] <= 1e-5
    with torch.no_grad():  # and it is the converted model: ibnorm.load computes the same logits
        reference = ibnorm.load(dirs[kind])(torch.tensor(IDS)).logits
    assert (facts[kind, way][1]["logits"] - reference).abs().max().item() <= 1e-4


def test_no_ibnorm_class_is_named_like_an_rmsnorm():
    import ibnorm.hf.modeling_ibnorm as shipped
    import ibnorm.layers as layers

    classes = [getattr(layers, n) for n in layers.__all__ if isinstance(getattr(layers, n), type)]
    classes += [v for v in vars(shipped).values() if isinstance(v, type) and issubclass(v, torch.nn.Module)]
    assert layers.IBNormRMS in classes and shipped.IBNorm in classes
    assert [c.__name__ for c in classes if c.__name__.endswith("RMSNorm")] == []
    assert layers.IBRMSNorm is layers.IBNormRMS and ibnorm.IBRMSNorm2d is ibnorm.IBNormRMS2d  # old names still import


def test_manifest_with_the_old_class_name_still_loads(dirs, tmp_path):
    import shutil

    d = tmp_path / "old_names"
    shutil.copytree(dirs["llama"], d)
    manifest = json.loads((d / "ibnorm_manifest.json").read_text())
    assert {layer["new_class"] for layer in manifest["layers"]} == {"IBNormRMS"}
    for layer in manifest["layers"]:
        layer["new_class"] = "IBRMSNorm"  # what conversions before the rename wrote
    (d / "ibnorm_manifest.json").write_text(json.dumps(manifest))
    with torch.no_grad():
        assert torch.equal(ibnorm.load(d)(torch.tensor(IDS)).logits, ibnorm.load(dirs["llama"])(torch.tensor(IDS)).logits)


def _shipped_layers() -> torch.nn.Sequential:
    """rms/tanh, layer/log, rms/power with per-channel λ (a third at 0, one below the series cutoff)."""
    from ibnorm.hf.modeling_ibnorm import IBNorm

    g = torch.Generator().manual_seed(0)
    mods = []
    for grouping, op in (("rms", "tanh"), ("layer", "log"), ("rms", "power")):
        m = IBNorm({"name": "n", "grouping": grouping, "normalized_shape": [24], "channel_dim": -1, "num_groups": None,
                    "eps": 1e-5, "weight": True, "bias": grouping == "layer", "op": op, "lam_shape": [24]})
        with torch.no_grad():
            m.lam.copy_(torch.rand(24, generator=g))
            m.lam[::3] = 0.0
            m.lam[1] = 1e-5
            m.weight.normal_(1.0, 0.3, generator=g)
        mods.append(m)
    return torch.nn.Sequential(*mods).eval()


def test_ibnorm_compiles_fullgraph():
    from ibnorm import functional as IBF

    model = _shipped_layers()
    x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(1)) * 3
    compiled = torch.compile(model, fullgraph=True, backend="inductor", dynamic=False)
    with torch.no_grad():
        got = compiled(x)
        want = x.double()
        for m in model:  # the reference math in float64
            f = IBF.ib_layer_norm if m.grouping == "layer" else IBF.ib_rms_norm
            args = (m.weight.double(), m.bias.double()) if m.grouping == "layer" else (m.weight.double(),)
            want = f(want, (24,), *args, m.lam.double(), m.op, m.eps)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_fx_trace_sees_one_opaque_call():
    # vLLM's fusers trace forward with torch.fx and match rsqrt(mean(x²) + eps) or rms_norm; IBNorm shows neither.
    graph = torch.fx.symbolic_trace(_shipped_layers()[0]).graph
    calls = [n for n in graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    assert [getattr(n.target, "__name__", n.target) for n in calls] == ["ib_norm"]


@pytest.mark.parametrize("traced", [False, True])
def test_lambda_gets_no_gradient(dirs, monkeypatch, traced):
    """λ is fixed in the shipped code although transformers' loading leaves every parameter requiring grad."""
    import transformers

    import ibnorm.hf.modeling_ibnorm as shipped

    monkeypatch.setattr(shipped, "_traced", lambda: traced)  # True: the exact form compile and export run
    model = transformers.AutoModelForCausalLM.from_pretrained(dirs["llama"])
    ids = torch.tensor(IDS)
    model(input_ids=ids, labels=ids).loss.backward()
    norms = [m for m in model.modules() if isinstance(m, shipped.IBNorm)]
    assert norms and all(m.lam.grad is None and m.weight.grad is not None for m in norms)
