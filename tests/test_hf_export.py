"""Converted transformers checkpoints are their own architecture, read right by standard clients.

Reference everywhere: ``ibnorm.load`` of the same conversion in format 1 (ibnorm's own layers), and
``ibnorm.functional`` for the shipped IBNorm module.  Clients run on the upgraded (format 2) copy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ibnorm
from ibnorm.hf import base_config, base_config_dict, hf_config_for, upgrade
from models import MINILM, needs_minilm, randomize_lambda, tiny_hf, tiny_lm_with_tokenizer

HAVE_LM_EVAL = importlib.util.find_spec("lm_eval") is not None
HAVE_ST = importlib.util.find_spec("sentence_transformers") is not None
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FAMILIES = {  # kind: (op, Auto class)
    "llama": ("tanh", "AutoModelForCausalLM"),
    "qwen3": ("log", "AutoModelForCausalLM"),
    "gemma": ("power", "AutoModelForCausalLM"),
    "gpt2": ("tanh", "AutoModelForCausalLM"),
    "bert": ("log", "AutoModel"),
}
IDS = [[3, 17, 42, 99, 5, 64, 7, 120], [1, 2, 3, 4, 5, 6, 7, 8]]
PROMPT = "The Python language"
TEXTS = ["The quick brown fox jumps over the lazy dog near the river bank.",
         "Python is a programming language that lets you work quickly and integrate systems more effectively.",
         "A module is a file containing Python definitions and statements."]


def _tiny_bert():
    import transformers as T

    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=128, max_position_embeddings=64))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.3)
    return model.eval()


def as_format_1(directory: Path) -> None:
    """Rewrite a converted directory the way ibnorm's format 1 wrote it: the base config.json with an
    ``ibnorm`` section, no code files, and a manifest whose layers name their grouping "variant"."""
    from ibnorm.hf import base_config_dict

    config = json.loads((directory / "config.json").read_text())
    manifest = json.loads((directory / "ibnorm_manifest.json").read_text())
    if manifest["family"] == "hf":
        base = base_config_dict(config)
        base["ibnorm"] = {"format": "ibnorm-converted/1", "manifest": "ibnorm_manifest.json", "op": config["ibnorm"]["op"]}
        from ibnorm.hf.configuration_ibnorm import CODE_FILES

        for name in CODE_FILES:
            (directory / name).unlink()
    else:
        base = {"architecture": config["ibnorm"]["base_architecture"], "library": "timm", "num_classes": config["num_classes"],
                "ibnorm": {"format": "ibnorm-converted/1", "manifest": "ibnorm_manifest.json", "op": config["ibnorm"]["op"]}}
    (directory / "config.json").write_text(json.dumps(base, indent=2))
    manifest["format"] = "ibnorm-converted/1"
    manifest["layers"] = [{("variant" if k == "grouping" else k): v for k, v in layer.items()} for layer in manifest["layers"]]
    (directory / "ibnorm_manifest.json").write_text(json.dumps(manifest, indent=2))


def _convert(src: Path, root: Path, name: str, op: str, seed: int) -> tuple[Path, Path]:
    """(format 1 directory, the same upgraded to format 2); the conversion itself writes format 2 directly,
    and upgrading the format-1 copy gives exactly that config."""
    v1, v2 = root / f"v1_{name}", root / f"v2_{name}"
    ibnorm.convert_checkpoint(str(src), v1, ibnorm.ConvertOptions(lam=0.3, op=op))
    randomize_lambda(v1, seed)
    direct = json.loads((v1 / "config.json").read_text())
    as_format_1(v1)
    shutil.copytree(v1, v2)
    upgrade(v2)
    assert json.loads((v2 / "config.json").read_text()) == direct
    return v1, v2


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf_export")
    out = {"root": root}
    for i, (kind, (op, _)) in enumerate(FAMILIES.items()):
        src = root / f"src_{kind}"
        (_tiny_bert() if kind == "bert" else tiny_hf(kind)).save_pretrained(src)
        out[kind] = (src, *_convert(src, root, kind, op, seed=i))
    src = tiny_lm_with_tokenizer(root / "src_lm")
    out["lm"] = (src, *_convert(src, root, "lm", "tanh", seed=10))
    if MINILM is not None:
        out["minilm"] = (MINILM, *_convert(Path(MINILM), root, "minilm", "tanh", seed=11))
    return out


def _clean_env(root: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_MODULES_CACHE=str(root / "hf_modules"), HF_DATASETS_CACHE=str(root / "datasets"))
    return env


def _run(args: list[str], root: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=root, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def remote(dirs) -> tuple[dict, dict]:
    """All standard clients, once, in a process where ibnorm cannot be imported."""
    from safetensors.torch import load_file

    root = dirs["root"] / "remote"
    root.mkdir()
    job = {"out": str(root),
           "families": {k: {"dir": str(dirs[k][2]), "auto": auto, "ids": IDS} for k, (_, auto) in FAMILIES.items()},
           "lm": {"dir": str(dirs["lm"][2]), "prompt": PROMPT}}
    if "minilm" in dirs and HAVE_ST:
        job["minilm"] = {"dir": str(dirs["minilm"][2]), "texts": TEXTS}
    (root / "job.json").write_text(json.dumps(job))
    _run([sys.executable, str(HERE / "hf_clients.py"), str(root / "job.json")], root, _clean_env(dirs["root"]))
    return json.loads((root / "results.json").read_text()), load_file(root / "tensors.safetensors")


def _outputs(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor(ids))
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_remote_code_matches_ibnorm_load(dirs, remote, kind):
    import transformers

    results, tensors = remote
    assert results["ibnorm_importable"] is False
    src, v1, _ = dirs[kind]
    reference = _outputs(ibnorm.load(v1))
    assert (tensors[kind] - reference).abs().max().item() <= 1e-4
    # The base architecture with the same weights is a different model: the check can fail.
    base = getattr(transformers, FAMILIES[kind][1]).from_pretrained(src)
    assert (_outputs(base) - reference).abs().max().item() > 1e-3
    assert results[f"{kind}.classes"][0].startswith("IBNorm") and results[f"{kind}.classes"][1].startswith("IBNorm")


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_stock_transformers_refuses(remote, kind):
    results, _ = remote
    message = results[f"{kind}.stock"]
    assert message.startswith("ValueError") and "trust_remote_code" in message


def test_pipeline_and_generate_without_ibnorm(dirs, remote):
    import transformers

    results, _ = remote
    _, v1, _ = dirs["lm"]
    tok = transformers.AutoTokenizer.from_pretrained(v1)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    expected = ibnorm.load(v1).generate(ids, max_new_tokens=8, do_sample=False)
    assert results["generate"] == expected.tolist()
    assert results["pipeline"] == tok.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)
    assert results["pipeline_class"] == "IBNormLlamaForCausalLM"


@needs_minilm
@pytest.mark.skipif(not HAVE_ST, reason="sentence-transformers not installed (pip install -e '.[dev]')")
def test_sentence_transformers_minilm(dirs, remote):
    import transformers

    _, tensors = remote
    _, v1, _ = dirs["minilm"]
    tok = transformers.AutoTokenizer.from_pretrained(v1)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = ibnorm.load(v1)(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    reference = F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert (tensors["minilm"] - reference).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_registered_loading_and_save_roundtrip(dirs, tmp_path, kind):
    import transformers

    _, v1, v2 = dirs[kind]
    auto = getattr(transformers, FAMILIES[kind][1])
    model = auto.from_pretrained(v2)  # no trust_remote_code: ibnorm's registration
    assert type(model).__module__ == "ibnorm.hf.modeling_ibnorm"
    out = _outputs(model)
    assert (out - _outputs(ibnorm.load(v1))).abs().max().item() <= 1e-4
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    original = json.loads((v2 / "config.json").read_text())
    for key in ("model_type", "auto_map", "ibnorm", "architectures"):
        assert saved[key] == original[key], key
    assert (tmp_path / "saved" / "modeling_ibnorm.py").read_bytes() == (v2 / "modeling_ibnorm.py").read_bytes()
    assert torch.equal(_outputs(auto.from_pretrained(tmp_path / "saved")), out)


def test_import_ibnorm_first_is_light_and_registers(dirs):
    code = ("import sys, ibnorm\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(dirs['gemma'][2])!r})\n"
            "print(type(m).__module__, type(m).__name__)\n")
    env = {**_clean_env(dirs["root"]), "PYTHONPATH": str(REPO)}
    proc = _run([sys.executable, "-c", code], dirs["root"], env)
    assert proc.stdout.split()[-2:] == ["ibnorm.hf.modeling_ibnorm", "IBNormGemmaForCausalLM"]


def _perplexities(model, tok, texts: list[str]) -> dict:
    """Rolling log-likelihood of each text as lm-eval defines it: tokens without special tokens,
    the first conditioned on the prefix token (BOS, else EOS); perplexity per word and per byte."""
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    total = 0.0
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids
        x = torch.tensor([[prefix] + ids[:-1]])
        with torch.no_grad():
            logp = torch.log_softmax(model(x).logits.double(), -1)
        total += logp[0, torch.arange(len(ids)), torch.tensor(ids)].sum().item()
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"word_perplexity": torch.tensor(-total / words).exp().item(), "byte_perplexity": torch.tensor(-total / nbytes).exp().item()}


@pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm-eval not installed (pip install -e '.[dev]')")
def test_lm_eval_scores_like_ibnorm_load(dirs):
    import transformers

    root = dirs["root"] / "lm_eval"
    root.mkdir()
    with open(root / "docs.jsonl", "w") as f:
        for t in TEXTS:
            f.write(json.dumps({"text": t}) + "\n")
    (root / "ibnorm_ppl.yaml").write_text(
        "task: ibnorm_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {root / 'docs.jsonl'}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n')
    code = ("import sys; sys.modules['ibnorm'] = None\nfrom lm_eval.__main__ import cli_evaluate\n"
            "sys.argv = ['lm_eval'] + sys.argv[1:]\ncli_evaluate()\n")
    _run([sys.executable, "-c", code, "--model", "hf", "--model_args", f"pretrained={dirs['lm'][2]},trust_remote_code=True",
          "--tasks", "ibnorm_ppl", "--include_path", str(root), "--device", "cpu", "--batch_size", "1",
          "--output_path", str(root / "out")], root, _clean_env(dirs["root"]))
    scores = json.loads(next((root / "out").rglob("results_*.json")).read_text())["results"]["ibnorm_ppl"]
    _, v1, _ = dirs["lm"]
    expected = _perplexities(ibnorm.load(v1), transformers.AutoTokenizer.from_pretrained(v1), TEXTS)
    for metric, value in expected.items():
        assert scores[f"{metric},none"] == pytest.approx(value, rel=1e-5), metric


def test_trainer_one_step(dirs, tmp_path):
    import transformers

    _, v1, v2 = dirs["lm"]
    model = transformers.AutoModelForCausalLM.from_pretrained(v2)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 300, (2, 16), generator=g)]
    norm = "model.layers.0.input_layernorm"
    before = {k: v.clone() for k, v in model.get_submodule(norm).state_dict().items()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, learning_rate=1e-2,
                                          use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, warmup_steps=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    loss = trainer.train().training_loss
    with torch.no_grad():
        batch = torch.stack([d["input_ids"] for d in data])
        expected = ibnorm.load(v1)(input_ids=batch, labels=batch).loss.item()
    assert loss == pytest.approx(expected, rel=1e-4)
    after = model.get_submodule(norm).state_dict()
    assert not torch.equal(after["weight"], before["weight"])  # γ is trained
    assert torch.equal(after["lam"], before["lam"])  # λ is a fixed buffer in the exported code


def test_peft_lora_adapter(dirs, tmp_path):
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    _, _, v2 = dirs["lm"]
    base_out = _outputs(transformers.AutoModelForCausalLM.from_pretrained(v2), [[5, 6, 7, 8]])
    model = get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(v2),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    out = _outputs(model, [[5, 6, 7, 8]])
    assert (out - base_out).abs().max().item() > 1e-3
    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(v2), tmp_path / "adapter")
    assert torch.allclose(_outputs(reloaded, [[5, 6, 7, 8]]), out, atol=1e-6)


# --- the shipped IBNorm module against the reference math ------------------------------------

def _layer(grouping: str, shape, op: str, lam_shape, channel_dim: int = -1, num_groups=None, weight=True, bias=True) -> dict:
    return {"name": "n", "grouping": grouping, "normalized_shape": list(shape), "channel_dim": channel_dim,
            "num_groups": num_groups, "eps": 1e-5, "weight": weight, "bias": bias, "op": op, "lam_shape": list(lam_shape)}


def _reference(case: str, x, w, b, lam, op):
    from ibnorm import functional as IBF

    ch = x.shape[1] if case in ("layer_channels_first", "group") else x.shape[-1]
    if case in ("rms", "rms_no_affine"):
        return IBF.ib_rms_norm(x, (ch,), w, lam, op, 1e-5)
    if case == "layer":
        return IBF.ib_layer_norm(x, (ch,), w, b, lam, op, 1e-5)
    if case == "layer_channels_first":
        return IBF.ib_layer_norm(x.movedim(1, -1), (ch,), w, b, lam, op, 1e-5).movedim(-1, 1)
    return IBF.ib_group_norm(x, 3, w, b, lam, op, 1e-5)


def _shipped_case(case: str, op: str, dtype, lam_zero: bool = False):
    from ibnorm.hf.modeling_ibnorm import IBNorm

    g = torch.Generator().manual_seed(3)
    ch = 12
    lam = (torch.rand(ch, generator=g, dtype=torch.float64) * 2).to(dtype)
    lam[::4] = 0.0
    lam[1] = 1e-5  # λ·|z| below the series cutoff
    if lam_zero:
        lam.zero_()
    w, b = torch.randn(ch, generator=g, dtype=dtype), torch.randn(ch, generator=g, dtype=dtype)
    affine = case != "rms_no_affine"
    grouping = "layer" if case.startswith("layer") else case.split("_")[0]
    layer = _layer(grouping, (ch,), op, (ch,), channel_dim=1 if case in ("layer_channels_first", "group") else -1,
                   num_groups=3 if case == "group" else None, weight=affine, bias=grouping != "rms")
    module = IBNorm(layer).to(dtype)
    with torch.no_grad():
        module.lam.copy_(lam)
        if affine:
            module.weight.copy_(w)
        if module.bias is not None:
            module.bias.copy_(b)
    x = torch.randn(4, 5, ch, generator=g, dtype=torch.float64).mul(3).add(0.5).to(dtype)
    x[0, 0, :2] = 0.0
    if case == "layer_channels_first":
        x = x.permute(0, 2, 1).unsqueeze(-1)  # N, C, H, 1
    elif case == "group":
        x = x.permute(0, 2, 1)  # N, C, L
    return module, x, (w if affine else None, b if grouping != "rms" else None, lam)


CASES = ["rms", "rms_no_affine", "layer", "layer_channels_first", "group"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", ["tanh", "log", "power"])
@pytest.mark.parametrize("case", CASES)
def test_shipped_module_matches_reference(case, op, dtype):
    """The exported IBNorm computes what ibnorm's reference computes, to the rounding of the compute
    dtype (per-channel λ, some 0; λ near the series cutoff; z = 0 entries), in float64 arithmetic."""
    module, x, (w, b, lam) = _shipped_case(case, op, dtype)
    with torch.no_grad():
        got = module(x)
        want = _reference(case, x.double(), *(None if t is None else t.double() for t in (w, b, lam)), op)
    assert got.dtype == dtype
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_shipped_module_at_lambda_zero_is_the_reference_bitwise(case, dtype):
    module, x, (w, b, lam) = _shipped_case(case, "tanh", dtype, lam_zero=True)
    with torch.no_grad():
        assert torch.equal(module(x), _reference(case, x, w, b, lam, "tanh"))


def test_shipped_rows_run_the_few_op_torch_form(monkeypatch):
    import ibnorm.hf.modeling_ibnorm as shipped

    calls = []
    real = shipped.fast_row_norm
    monkeypatch.setattr(shipped, "fast_row_norm", lambda *a: calls.append(1) or real(*a))
    for case in ("rms", "layer_channels_first"):
        module, x, _ = _shipped_case(case, "tanh", torch.float32)
        module(x)
    assert len(calls) == 2


def test_hf_config_keeps_every_base_field(dirs):
    import transformers

    from ibnorm.hf import layer_entries

    src, v1, v2 = dirs["gpt2"]
    base = transformers.AutoConfig.from_pretrained(src).to_dict()
    cfg = hf_config_for(base, layer_entries(ibnorm.load(v1)), "tanh")
    assert cfg["model_type"] == "ibnorm_gpt2" and cfg["architectures"] == ["IBNormGPT2LMHeadModel"]
    assert {k: v for k, v in cfg.items() if k in base and k not in ("model_type", "architectures")} == \
        {k: v for k, v in base.items() if k not in ("model_type", "architectures", "_name_or_path")}
    assert [layer["name"] for layer in cfg["ibnorm"]["layers"]] == [layer["name"] for layer in json.loads((v1 / "ibnorm_manifest.json").read_text())["layers"]]
    assert base_config_dict(cfg)["model_type"] == "gpt2" and "ibnorm" not in base_config_dict(cfg)
    rebuilt = base_config(json.loads((v2 / "config.json").read_text()))  # what ibnorm.load builds its skeleton from
    assert type(rebuilt) is transformers.GPT2Config
    assert {k: v for k, v in rebuilt.to_dict().items() if k in base and k != "_name_or_path"} == \
        {k: v for k, v in base.items() if k != "_name_or_path"}
    assert json.loads((v2 / "config.json").read_text())["ibnorm"]["layers"] == cfg["ibnorm"]["layers"]
    with pytest.raises(ValueError, match="already an ibnorm config"):
        hf_config_for(cfg, [], "tanh")


# --- timm, upgrade, CLI ---------------------------------------------------------------------

def test_timm_output_is_refused_by_timm(tmp_path):
    import timm

    v1 = tmp_path / "v1"
    ibnorm.convert_checkpoint("timm:resnet10t", v1, ibnorm.ConvertOptions(lam=0.2), pretrained=False)
    with pytest.raises(RuntimeError, match="Unknown model .*load it with ibnorm.load"):  # as converted
        timm.create_model(f"local-dir:{v1}", pretrained=True)
    as_format_1(v1)
    assert upgrade(v1)["changed"] is True
    with pytest.raises(RuntimeError, match="Unknown model .*load it with ibnorm.load"):
        timm.create_model(f"local-dir:{v1}", pretrained=True)
    assert json.loads((v1 / "ibnorm_manifest.json").read_text())["format"] == "ibnorm-converted/2"


def _snapshot(d: Path) -> dict:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_upgrade_is_atomic_and_idempotent(dirs, tmp_path, monkeypatch):
    import ibnorm.hf.upgrade_dir as up

    d = tmp_path / "old"
    shutil.copytree(dirs["llama"][1], d)
    before = _snapshot(d)

    def boom(out):
        raise OSError("disk full")

    monkeypatch.setattr(up, "write_remote_code", boom)
    with pytest.raises(OSError, match="disk full"):
        upgrade(d)
    assert _snapshot(d) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no temporary directories left
    monkeypatch.undo()
    assert upgrade(d)["changed"] is True
    after = _snapshot(d)
    assert after["model.safetensors"] == before["model.safetensors"]
    assert upgrade(d)["changed"] is False and _snapshot(d) == after


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "ibnorm_cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_upgrade_cli(dirs, tmp_path):
    from ibnorm.errors import SourceError

    d = tmp_path / "old"
    shutil.copytree(dirs["gpt2"][1], d)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ibnorm_manifest.json").write_text("{not json")
    for path, needle in ((dirs["gpt2"][0], "no ibnorm_manifest.json"), (tmp_path / "bad", "corrupt")):
        with pytest.raises(SourceError, match=needle):
            upgrade(path)
    proc = _cli("upgrade", "missing", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and "not a converted model directory" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = _cli("upgrade", str(d), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["model_type"] == "ibnorm_gpt2"
    assert json.loads((d / "config.json").read_text())["model_type"] == "ibnorm_gpt2"


def test_resaved_converted_model_is_refused_as_a_source(dirs, tmp_path):
    """A converted model saved back by transformers (its own architecture, no manifest) is not read as a source."""
    from ibnorm.errors import SourceError

    d = tmp_path / "resaved"
    shutil.copytree(dirs["llama"][2], d)
    (d / "ibnorm_manifest.json").unlink()
    with pytest.raises(SourceError, match="ibnorm-converted model"):
        ibnorm.convert_checkpoint(str(d), tmp_path / "out", ibnorm.ConvertOptions(lam=0.0))
    assert not (tmp_path / "out").exists()
