"""The command line: help, version, JSON output, and one-line errors for bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models import tiny_hf

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


def ibnorm(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ibnorm_cli", *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600)


def assert_one_line_error(r: subprocess.CompletedProcess, fragment: str) -> None:
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert fragment in lines[0], lines[0]


def test_version_and_help():
    import ibnorm as lib

    r = ibnorm("--version")
    assert r.returncode == 0 and lib.__version__ in r.stdout
    r = ibnorm("--help")
    for cmd in ("convert", "finetune", "inspect", "eval"):
        assert cmd in r.stdout


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("src") / "tiny-llama"
    tiny_hf("llama").save_pretrained(d)
    return d


def test_missing_path(tmp_path):
    r = ibnorm("convert", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert_one_line_error(r, "source not found")
    assert not (tmp_path / "o").exists()


def test_truncated_safetensors(hf_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((hf_dir / "config.json").read_text())
    data = (hf_dir / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    r = ibnorm("convert", str(bad), "--out", str(tmp_path / "o"), "--lam", "0.1")
    assert_one_line_error(r, "truncated")
    assert not (tmp_path / "o").exists()
    r = ibnorm("inspect", str(bad / "model.safetensors"))
    assert_one_line_error(r, "truncated")


def test_corrupt_safetensors(hf_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((hf_dir / "config.json").read_text())
    data = bytearray((hf_dir / "model.safetensors").read_bytes())
    data[8:20] = b"\x00garbage!!\xff\xfe"
    (bad / "model.safetensors").write_bytes(bytes(data))
    r = ibnorm("convert", str(bad), "--out", str(tmp_path / "o"))
    assert_one_line_error(r, "corrupt")
    assert not (tmp_path / "o").exists()


def test_non_model_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    r = ibnorm("convert", str(f), "--out", str(tmp_path / "o"))
    assert_one_line_error(r, "not a model")
    r = ibnorm("inspect", str(f))
    assert_one_line_error(r, "not a safetensors")


def test_unknown_architecture(hf_dir, tmp_path):
    bad = tmp_path / "arch"
    bad.mkdir()
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["model_type"] = "no-such-architecture"
    cfg["architectures"] = ["NoSuchForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes((hf_dir / "model.safetensors").read_bytes())
    r = ibnorm("convert", str(bad), "--out", str(tmp_path / "o"))
    assert_one_line_error(r, "no-such-architecture")
    r = ibnorm("convert", "timm:no_such_net", "--out", str(tmp_path / "o"))
    assert_one_line_error(r, "unknown timm architecture")


def test_pickle_needs_flag(tmp_path):
    d = tmp_path / "pkl"
    model = tiny_hf("llama")
    model.config.save_pretrained(d)
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    r = ibnorm("convert", str(d), "--out", str(tmp_path / "o"))
    assert_one_line_error(r, "--allow-pickle")


def test_wrong_option_and_existing_out(hf_dir, tmp_path):
    r = ibnorm("convert", str(hf_dir), "--out", str(tmp_path / "o"), "--op", "cubic")
    assert_one_line_error(r, "unknown --op")
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = ibnorm("convert", str(hf_dir), "--out", str(out), "--lam", "0.1")
    assert_one_line_error(r, "--force")
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_convert_inspect_eval_json(hf_dir, tmp_path):
    out = tmp_path / "conv"
    r = ibnorm("convert", str(hf_dir), "--out", str(out), "--lam", "0.2", "--op", "log", "--json")
    assert r.returncode == 0, r.stderr
    manifest = json.loads(r.stdout)
    assert len(manifest["layers"]) == 5 and manifest["options"]["op"] == "log"
    r = ibnorm("inspect", str(out), "--json")
    info = json.loads(r.stdout)
    assert r.returncode == 0 and info["lambda"]["layers"] == 5 and abs(info["lambda"]["mean"] - 0.2) < 1e-6
    assert info["manifest"]["source"]["name"] == str(hf_dir) and not info["problems"]
    # --force replaces atomically
    r = ibnorm("convert", str(hf_dir), "--out", str(out), "--lam", "0.0", "--force", "--json")
    assert r.returncode == 0 and json.loads(ibnorm("inspect", str(out), "--json").stdout)["lambda"]["mean"] == 0.0
    assert not list(tmp_path.glob(".conv*"))  # no temporary directories left behind


def test_inspect_flags_nan_and_bad_lambda(tmp_path):
    f = tmp_path / "m.safetensors"
    save_file({"model.norm.weight": torch.tensor([1.0, float("nan")]), "model.norm.lam": torch.tensor([0.1, -2.0]),
               "model.embed.weight": torch.zeros(4, 2)}, str(f))
    r = ibnorm("inspect", str(f), "--json")
    info = json.loads(r.stdout)
    assert r.returncode == 1
    assert any("NaN" in p for p in info["problems"]) and any("out of range" in p for p in info["problems"])


def test_inspect_sharded(tmp_path):
    d = tmp_path / "sharded"
    tiny_hf("gpt2").save_pretrained(d, max_shard_size="40KB")
    assert (d / "model.safetensors.index.json").exists()
    info = json.loads(ibnorm("inspect", str(d), "--json").stdout)
    assert info["files"] > 1 and info["norm_layers"] == 5
    (sorted(d.glob("model-*.safetensors"))[0]).unlink()
    r = ibnorm("inspect", str(d))
    assert_one_line_error(r, "missing shard")


def test_offline_hub_id_not_cached(tmp_path):
    env_home = tmp_path / "hf"
    r = subprocess.run([sys.executable, "-m", "ibnorm_cli", "convert", "someorg/not-a-cached-model", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env={**ENV, "HF_HOME": str(env_home), "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert_one_line_error(r, "someorg/not-a-cached-model")
    assert "`hf download someorg/not-a-cached-model`" in r.stderr


def test_eval_text_compare(tmp_path):
    from models import tiny_lm_with_tokenizer

    src = tiny_lm_with_tokenizer(tmp_path / "src")
    out = tmp_path / "conv"
    assert ibnorm("convert", str(src), "--out", str(out), "--lam", "0.5", "--json").returncode == 0
    r = ibnorm("eval", str(out), "--data", "builtin:pydoc:eval", "--compare", str(src), "--seq-len", "64", "--max-tokens", "512", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["metric"] == "perplexity" and res["source"] > 1 and res["converted"] > 1
    assert abs(res["relative_change"] - (res["converted"] / res["source"] - 1)) < 1e-9


def test_eval_image_folder_top1(tmp_path):
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), (i * 60, 100, 200 if c == "cat" else 20)).save(tmp_path / "imgs" / c / f"{i}.png")
    r = ibnorm("convert", "timm:resnet18", "--random-weights", "--out", str(tmp_path / "r18"), "--calib", str(tmp_path / "imgs"), "--json")
    assert r.returncode == 0, r.stderr
    manifest = json.loads(r.stdout)
    assert manifest["calibration"]["images"] == 6 and manifest["end_to_end"]["metric"] == "KL nats/image"
    r = ibnorm("eval", str(tmp_path / "r18"), "--data", str(tmp_path / "imgs"), "--json")
    res = json.loads(r.stdout)
    assert r.returncode == 0 and res["metric"] == "top-1" and 0.0 <= res["value"] <= 1.0 and res["images"] == 6


def test_first_commands_run_as_typed(hf_dir, tmp_path):
    """`convert` without --out writes ./NAME-ibnorm (and refuses it next time); a converted directory is
    refused as a source, never read as its base model; `finetune` without --data says what it uses."""
    work = tmp_path / "cwd"
    work.mkdir()
    r = ibnorm("convert", str(hf_dir), "--lam", "0.2", cwd=work)
    assert r.returncode == 0, r.stderr
    out = work / "tiny-llama-ibnorm"
    assert "tiny-llama-ibnorm" in r.stdout and (out / "ibnorm_manifest.json").is_file()
    assert_one_line_error(ibnorm("convert", str(hf_dir), "--lam", "0.2", cwd=work), "already exists")
    for lam in ("0", "0.3"):
        r = ibnorm("convert", str(out), "--lam", lam, "--out", str(tmp_path / f"again{lam}"))
        assert_one_line_error(r, "already an ibnorm conversion")
        assert not (tmp_path / f"again{lam}").exists()
    import ibnorm as lib

    data, why = lib.finetune.default_data(str(out))
    assert data == "builtin:pydoc:train" and "built-in" in why  # converted without calibration data
