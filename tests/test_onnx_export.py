"""``ibnorm export --format onnx``: onnxruntime on CPU computes what ``ibnorm.load`` computes; the rest is refused.

Reference: ``ibnorm.load`` of the same directory (ibnorm's own layers, not the shipped code that is
exported), and for the encoder also ``SentenceTransformer(DIR, trust_remote_code=True).encode``.
Tolerance: max |onnx − reference| / max |reference| ≤ 1e-4, at two sequence lengths each.  Every op
(tanh, log, power) is in the causal LM (one per layer), both groupings export supports (rms: the
LLaMA, layer: MiniLM) are checked.  The exporter is the slow part (about 40 s a model here), so each
model is exported once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ibnorm
from models import MINILM, needs_minilm, randomize_lambda, tiny_hf
from test_cli import assert_one_line_error, ibnorm as ibnorm_cli

onnx = pytest.importorskip("onnx", reason="onnx not installed (pip install -e '.[dev]')")
ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install -e '.[dev]')")
pytest.importorskip("onnxscript", reason="onnxscript not installed (pip install -e '.[dev]')")

from ibnorm.deploy import export_onnx, relative_error, run_onnx  # noqa: E402
from ibnorm.errors import IBNormError, OptionError, OutputError, OutputExistsError, SourceError  # noqa: E402
from ibnorm.validate import check_export  # noqa: E402

TOLERANCE = 1e-4
LAYER_OPS = {"model.layers.0.": "tanh", "model.layers.1.": "log", "model.norm": "power"}
SHORT = ["A cat.", "Python lists are mutable sequences."]
LONG = ["The quick brown fox jumps over the lazy dog near the river bank while the farmer watches from the hill "
        "and the sun sets slowly behind the mountains, painting the sky in orange and purple.",
        "A module is a file containing Python definitions and statements; the file name is the module name with the "
        "suffix .py appended, and within a module its name is available as the value of __name__."]


def _set_ops(directory: Path) -> None:
    """One compression op per layer, in both the shipped config and the manifest (what ibnorm.load reads)."""
    for name, key in (("config.json", "ibnorm"), ("ibnorm_manifest.json", None)):
        doc = json.loads((directory / name).read_text())
        for layer in (doc[key] if key else doc)["layers"]:
            layer["op"] = next(op for prefix, op in LAYER_OPS.items() if layer["name"].startswith(prefix))
        (directory / name).write_text(json.dumps(doc, indent=2))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("onnx_llama")
    src, conv = root / "src", root / "conv"
    tiny_hf("llama").save_pretrained(src)
    ibnorm.convert_checkpoint(str(src), conv, ibnorm.ConvertOptions(lam=0.3, op="tanh"))
    randomize_lambda(conv, seed=5)
    _set_ops(conv)
    return {"root": root, "src": src, "dir": conv}


@pytest.fixture(scope="module")
def llama(converted) -> dict:
    out = converted["root"] / "llama.onnx"
    return {**converted, "onnx": out, "result": export_onnx(check_export(converted["dir"], "onnx", out))}


def _ids(shape: tuple[int, int], seed: int, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return ids, mask


def test_llama_export_is_valid_and_described(llama):
    onnx.checker.check_model(str(llama["onnx"]))
    r = llama["result"]
    assert r["kind"] == "causal-lm" and r["output"] == "logits" and r["kv_cache"] is False
    assert r["self_check_relative_error"] <= TOLERANCE and r["bytes"] == llama["onnx"].stat().st_size
    model = onnx.load(str(llama["onnx"]))
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    ops = {n.op_type for n in model.graph.node}
    assert {"Tanh", "Log", "Exp"} <= ops  # every op's primitives are in the graph
    assert not any(p.name == "llama.onnx" for p in llama["root"].glob(".*"))  # no temporary left


@pytest.mark.parametrize("shape,pad", [((2, 6), 2), ((3, 23), 0)])
def test_llama_onnxruntime_matches_ibnorm_load(llama, shape, pad):
    ids, mask = _ids(shape, seed=shape[1], pad=pad)
    got = run_onnx(llama["onnx"], ids, mask)
    with torch.no_grad():
        want = ibnorm.load(llama["dir"])(input_ids=ids, attention_mask=mask).logits
        base = __import__("transformers").AutoModelForCausalLM.from_pretrained(llama["src"])(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()  # padded positions attend to nothing
    assert got.shape == want.shape
    assert relative_error(got[keep], want[keep]) <= TOLERANCE
    assert relative_error(base[keep], want[keep]) > 1e-2  # the source model differs: the check can fail


@needs_minilm
def test_minilm_sentence_embeddings_through_the_cli(tmp_path):
    from sentence_transformers import SentenceTransformer

    conv = tmp_path / "minilm"
    ibnorm.convert_checkpoint(str(MINILM), conv, ibnorm.ConvertOptions(lam=0.3, op="tanh"))
    randomize_lambda(conv, seed=7)
    out = tmp_path / "minilm.onnx"
    proc = ibnorm_cli("export", str(conv), "--format", "onnx", "--out", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["kind"] == "sentence-embedding"
    onnx.checker.check_model(str(out))
    st = SentenceTransformer(str(conv), trust_remote_code=True, device="cpu")
    reference = ibnorm.load(conv)
    lengths = []
    for texts in (SHORT, LONG):
        batch = st.tokenizer(texts, padding=True, truncation=True, max_length=st.max_seq_length, return_tensors="pt")
        lengths.append(batch["input_ids"].shape[1])
        got = run_onnx(out, batch["input_ids"], batch["attention_mask"])
        assert relative_error(got, st.encode(texts, convert_to_tensor=True)) <= TOLERANCE
        with torch.no_grad():
            hidden = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        assert relative_error(got, F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)) <= TOLERANCE
    assert lengths[0] < 16 < lengths[1]


# --- refusals and bad input: one error line, nothing written ---------------------------------------


def test_gguf_is_refused_with_why_and_instead(converted):
    out = converted["root"] / "model.gguf"
    proc = ibnorm_cli("export", str(converted["dir"]), "--format", "gguf", "--out", str(out))
    assert_one_line_error(proc, "cannot carry IBNorm")
    assert "drop λ" in proc.stderr and "onnx" in proc.stderr and "trust_remote_code" in proc.stderr
    assert not out.exists()


def test_bad_directories_are_refused_by_the_cli(converted, tmp_path):
    for path, fragment in ((tmp_path / "missing", "does not exist"), (Path("/dev/null"), "is not a directory"),
                           (converted["src"], "no ibnorm_manifest.json")):
        assert_one_line_error(ibnorm_cli("export", str(path), "--format", "onnx", "--out", str(tmp_path / "x.onnx")), fragment)
    assert list(tmp_path.iterdir()) == []


def _variant(converted: dict, tmp_path: Path, edit) -> Path:
    d = tmp_path / "variant"
    shutil.copytree(converted["dir"], d)
    edit(d)
    return d


def _edit_json(name: str, change):
    def edit(d: Path) -> None:
        doc = json.loads((d / name).read_text())
        change(doc)
        (d / name).write_text(json.dumps(doc))
    return edit


@pytest.mark.parametrize("edit,error,fragment", [
    (_edit_json("ibnorm_manifest.json", lambda m: m["layers"][1].update(grouping="group")), SourceError,
     "model.layers.0.post_attention_layernorm is group"),
    (_edit_json("ibnorm_manifest.json", lambda m: m.update(task="encoder")), SourceError, "without modules.json"),
    (_edit_json("config.json", lambda c: c.update(model_type="llama")), SourceError, "ibnorm upgrade"),
])
def test_unsupported_models_are_refused(converted, tmp_path, edit, error, fragment):
    with pytest.raises(error, match=fragment):
        check_export(_variant(converted, tmp_path, edit), "onnx", tmp_path / "x.onnx")


def test_timm_models_are_refused(tmp_path):
    conv = tmp_path / "timm"
    ibnorm.convert_checkpoint("timm:resnet10t", conv, ibnorm.ConvertOptions(lam=0.2), pretrained=False)
    with pytest.raises(SourceError, match="is a timm model .*batch"):
        check_export(conv, "onnx", tmp_path / "x.onnx")


def test_output_checks(converted, tmp_path):
    existing = tmp_path / "old.onnx"
    existing.write_bytes(b"old")
    with pytest.raises(OutputExistsError, match="--force"):
        check_export(converted["dir"], "onnx", existing)
    assert check_export(converted["dir"], "onnx", existing, force=True).out == existing
    for out, fragment in ((tmp_path, "is a directory"), (tmp_path / "no" / "x.onnx", "does not exist"),
                          (converted["dir"] / "x.onnx", "inside the converted directory"), (Path("/dev/null"), "not a regular file")):
        with pytest.raises(OutputError, match=fragment):
            check_export(converted["dir"], "onnx", out)
    for fmt, fragment in (("tflite", "not supported"), ("GGUF", "cannot carry IBNorm")):
        with pytest.raises(OptionError, match=fragment):
            check_export(converted["dir"], fmt, tmp_path / "x")
    assert existing.read_bytes() == b"old"


def test_a_failed_check_writes_nothing(converted, tmp_path, monkeypatch):
    import ibnorm.deploy as deploy

    class Broken:  # an exporter result whose file is not ONNX
        model = type("M", (), {"metadata_props": {}})()

        def save(self, path, external_data=False):
            Path(path).write_bytes(b"not onnx")

    monkeypatch.setattr(deploy, "_to_onnx", lambda *a, **k: Broken())
    existing = tmp_path / "model.onnx"
    existing.write_bytes(b"old")
    with pytest.raises(IBNormError, match="invalid"):
        export_onnx(check_export(converted["dir"], "onnx", existing, force=True))
    assert existing.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_corrupt_config_is_one_error(converted, tmp_path):
    d = _variant(converted, tmp_path, lambda d: (d / "config.json").write_text("{not json"))
    assert_one_line_error(ibnorm_cli("export", str(d), "--format", "onnx", "--out", str(tmp_path / "x.onnx")), "corrupt")
