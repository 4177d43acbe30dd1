"""What a serving engine's Transformers backend does with a converted directory, as facts to assert.

Imported by tests/test_serving_contract.py (ibnorm's registered classes), and run as
``python serving_client.py DIR OUT.json`` in a process where ``import ibnorm`` fails, so the
classes come from the directory's ``auto_map`` (``trust_remote_code``), as in vLLM or SGLang.
The steps follow the engines' backends (vLLM ``model_executor/models/transformers/base.py``,
SGLang ``srt/models/transformers.py``): resolve the class named in ``auto_map``, read
``_supports_attention_backend``, build the *base* model with ``AutoModel.from_config`` on the meta
device, swap modules by class name, load checkpoint tensors into parameters, and run attention
through a function registered with transformers' ``AttentionInterface``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _facts_of_classes(directory: Path, remote: bool) -> dict:
    import transformers
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    config_dict = json.loads((directory / "config.json").read_text())
    auto_map = config_dict.get("auto_map", {})
    out: dict = {"auto_map": sorted(auto_map)}
    for key in ("AutoModel", "AutoModelForCausalLM"):
        if remote:
            cls = get_class_from_dynamic_module(auto_map[key], str(directory))
        else:
            cls = getattr(transformers, key)._model_mapping[transformers.AutoConfig.from_pretrained(directory).__class__]
        out[key] = {"class": cls.__name__, "module": cls.__module__,
                    "supports_attention_backend": getattr(cls, "_supports_attention_backend", None)}
    return out


def _facts_of_base_model(directory: Path, remote: bool) -> dict:
    """The base model as the engines build it: from the config, on the meta device."""
    import torch
    import transformers
    from safetensors import safe_open

    config = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=remote)
    try:
        with torch.device("meta"):
            model = transformers.AutoModel.from_config(config, trust_remote_code=remote)
    except Exception as e:  # noqa: BLE001  reported as a fact
        return {"meta_build": f"{type(e).__name__}: {e}"}
    prefix = model.base_model_prefix
    layers = {}
    for layer in config.ibnorm["layers"]:
        name = layer["name"].removeprefix(prefix + ".")
        layers[name] = type(model.get_submodule(name)).__name__
    params = dict(model.named_parameters())
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        keys = [k.removeprefix(prefix + ".") for k in f.keys() if not k.startswith("lm_head.")]
    return {
        "meta_build": "ok",
        "class": type(model).__name__,
        "layers": layers,
        # SGLang swaps every module whose class name ends in "RMSNorm" for its fused RMSNorm.
        "named_rmsnorm": [n for n, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")],
        # The engines' weight loaders fill parameters (and BatchNorm statistics) only.
        "not_parameters": [k for k in keys if k not in params],
    }


def _facts_of_attention(directory: Path, remote: bool, ids: list) -> tuple[dict, dict]:
    import torch
    import transformers
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen: list = []

    def counting_attention(module, query, key, value, attention_mask, **kwargs):
        seen.append(kwargs.get("ibnorm_marker"))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("ibnorm_counting", counting_attention)
    logits = {}
    for impl in ("sdpa", "eager", "ibnorm_counting"):
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=remote, attn_implementation=impl).eval()
        kwargs = {"ibnorm_marker": "engine-kwarg"} if impl == "ibnorm_counting" else {}
        with torch.no_grad():
            logits[impl] = model(torch.tensor(ids), use_cache=False, **kwargs).logits
    facts = {"calls": len(seen), "marker_seen": sum(m == "engine-kwarg" for m in seen),
             "layers": model.config.num_hidden_layers,
             "vs_sdpa": float((logits["ibnorm_counting"] - logits["sdpa"]).abs().max()),
             "vs_eager": float((logits["ibnorm_counting"] - logits["eager"]).abs().max())}
    return facts, {"logits": logits["ibnorm_counting"]}


def contract_facts(directory: str | Path, remote: bool, ids: list) -> tuple[dict, dict]:
    """(facts, tensors) of one converted causal-LM directory."""
    directory = Path(directory)
    attention, tensors = _facts_of_attention(directory, remote, ids)
    facts = {"classes": _facts_of_classes(directory, remote), "base_model": _facts_of_base_model(directory, remote),
             "attention": attention}
    return facts, tensors


def main() -> None:
    sys.modules["ibnorm"] = None  # any `import ibnorm` now raises ImportError: the engine has only the directory
    from safetensors.torch import save_file

    directory, out = Path(sys.argv[1]), Path(sys.argv[2])
    facts, tensors = contract_facts(directory, True, json.loads(sys.argv[3]))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out.with_suffix(".safetensors")))
    out.write_text(json.dumps(facts))


if __name__ == "__main__":
    main()
