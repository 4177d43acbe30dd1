"""Issue 11, table-driven at the library level: every bad input refused with one line before work;
faults (SIGTERM, SIGKILL, full disk) leave nothing half-written; files get the umask's mode."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ibnorm.errors import (CorruptFileError, IBNormError, NonFiniteError, OptionError, OutputError, OutputExistsError,
                           SourceError, StateMismatchError)
from ibnorm.io import atomic
from ibnorm.io.manifest import read_manifest, validate_manifest
from ibnorm.io.safetensors_index import INDEX_NAME, TensorIndex, read_header, require_float
from ibnorm import validate as V
from validation_helpers import (assert_clean_refusal, join_safetensors, one_error_line, run_cli, small_safetensors,
                                split_safetensors, tree)

# ----------------------------------------------------------------------------- options

GPT2_LIKE = {"n_positions": 64}
LLAMA_LIKE = SimpleNamespace(max_position_embeddings=128)

OPTION_CASES = [  # (check, args, expected value or the exception's message fragment)
    (V.check_lam, (None,), None), (V.check_lam, (0.0,), 0.0), (V.check_lam, (100,), 100.0),
    (V.check_lam, (1e30,), "--lam must be ≤ 100"), (V.check_lam, (float("nan"),), "--lam must be a finite"),
    (V.check_lam, (float("inf"),), "finite"), (V.check_lam, (-0.1,), "--lam must be ≥ 0"),
    (V.check_tolerance, (1.0,), 1.0), (V.check_tolerance, (1e-6,), 1e-6), (V.check_tolerance, (0.0,), "--tolerance must be > 0"),
    (V.check_tolerance, (-1.0,), "> 0"), (V.check_tolerance, (1.5,), "≤ 1"), (V.check_tolerance, (float("nan"),), "finite"),
    (V.check_budget, (0.0,), 0.0), (V.check_budget, (-0.01,), "--budget must be ≥ 0"), (V.check_budget, (float("inf"),), float("inf")),
    (V.check_budget, (float("-inf"),), "finite"), (V.check_budget, (float("nan"),), "finite"),
    (V.check_calib_samples, (1,), 1), (V.check_calib_samples, (-5,), "--calib-samples must be ≥ 1"),
    (V.check_calib_samples, (0,), "≥ 1"), (V.check_calib_samples, (2.5,), "whole number"),
    (V.check_seq_len, (2,), 2), (V.check_seq_len, (0,), "--seq-len must be ≥ 2"), (V.check_seq_len, (1,), "≥ 2"),
    (V.check_seq_len, (64, GPT2_LIKE), 64), (V.check_seq_len, (65, GPT2_LIKE), "exceeds the model's 64 positions"),
    (V.check_seq_len, (129, LLAMA_LIKE), "128 positions"), (V.check_seq_len, (10**6, {}), 10**6),
    (V.check_lr, (1e-3,), 1e-3), (V.check_lr, (float("nan"),), "--lr must be a finite"), (V.check_lr, (-1.0,), "--lr must be > 0"),
    (V.check_lr, (0.0,), "> 0"), (V.check_lora_rank, (1,), 1), (V.check_lora_rank, (0,), "--lora-rank must be ≥ 1"),
    (V.parse_size, ("2GiB",), 2 * 2**30), (V.parse_size, ("5GB",), 5 * 10**9), (V.parse_size, ("500MB",), 500 * 10**6),
    (V.parse_size, ("1.5 GiB",), int(1.5 * 2**30)), (V.parse_size, ("10kib",), 10 * 1024), (V.parse_size, ("3KB",), 3000),
    (V.parse_size, ("7MiB",), 7 * 2**20), (V.parse_size, (4096,), 4096), (V.parse_size, ("4096",), 4096),
    (V.parse_size, ("0",), "at least 1 byte"), (V.parse_size, ("-1GB",), "cannot read size"), (V.parse_size, ("abc",), "cannot read size"),
    (V.parse_size, ("5XB",), "cannot read size"), (V.parse_size, ("",), "cannot read size"), (V.parse_size, ("nanGB",), "cannot read size"),
    (V.parse_size, ("1e3GB",), "cannot read size"), (V.parse_size, (True,), "cannot read size"),
    (V.check_grouping, ("auto", {"rms", "batch"}), "auto"), (V.check_grouping, ("layer", {"rms"}), "layer"),
    (V.check_grouping, ("group", {"group"}), "group"), (V.check_grouping, ("batch", {"rms"}), "--grouping/--variant batch cannot replace this model's rms"),
    (V.check_grouping, ("rms", {"batch"}), "cannot replace this model's batch"), (V.check_grouping, ("group", {"batch", "group"}), "batch"),
    (V.check_weights_option, ("timm:resnet18", "w.safetensors"), None), (V.check_weights_option, ("gpt2", None), None),
    (V.check_weights_option, ("gpt2", "w.safetensors"), "--weights applies only to timm:NAME"),
    (V.check_weights_option, ("gpt2", None, True), "--random-weights applies only"),
    (V.check_device, ("cpu",), None), (V.check_device, ("gpu",), "--device 'gpu': use cpu, cuda or cuda:N"),
    (V.check_device, ("cuda:x",), "use cpu, cuda or cuda:N"),
    (V.check_device, (f"cuda:{torch.cuda.device_count()}",), "no such CUDA device"),
    (V.check_weights_option, ("timm:resnet18", "w", True), "exclude each other"),
]


@pytest.mark.parametrize("check,args,expected", OPTION_CASES, ids=lambda v: getattr(v, "__name__", None) or repr(v)[:30])
def test_option_checks(check, args, expected):
    if isinstance(expected, str) and not (check is V.check_grouping and expected in ("auto", "layer", "group")):
        with pytest.raises(OptionError) as e:
            check(*args)
        msg = str(e.value)
        assert expected in msg and "\n" not in msg, msg
    else:
        assert check(*args) == expected


def test_convert_and_finetune_option_bundles():
    ok = V.validate_convert_options(lam=None, tolerance=0.001, budget=0.01, calib_samples=32, seq_len=256, shard_size="2GiB")
    assert ok.shard_size == 2 * 2**30 and ok.seq_len == 256
    with pytest.raises(OptionError, match="--weights"):
        V.validate_convert_options(lam=None, tolerance=0.001, budget=0.01, calib_samples=32, seq_len=256, shard_size="5GB",
                                   source="gpt2", weights="x.safetensors")
    with pytest.raises(OptionError, match="exceeds the model's 64"):
        V.validate_convert_options(lam=0.1, tolerance=0.5, budget=0, calib_samples=1, seq_len=100, shard_size=10, config=GPT2_LIKE)
    V.validate_finetune_options(lr=1e-3, lora_rank=8, seq_len=32, steps=3)
    for bad, frag in (({"lr": float("nan")}, "--lr"), ({"lr": -1}, "--lr"), ({"lora_rank": 0}, "--lora-rank"),
                      ({"seq_len": 0}, "--seq-len"), ({"steps": 0}, "--steps"), ({"clip": float("inf")}, "--clip")):
        kw = {"lr": 1e-3, "lora_rank": 8, "seq_len": 32, **bad}
        with pytest.raises(OptionError, match=frag):
            V.validate_finetune_options(**kw)


def test_max_positions_from_configs():
    import transformers as T

    assert V.max_positions(T.GPT2Config(n_positions=77)) == 77
    assert V.max_positions(T.LlamaConfig(max_position_embeddings=99)) == 99
    assert V.max_positions(T.BertConfig(max_position_embeddings=512)) == 512
    assert V.max_positions({}) is None


# ----------------------------------------------------------------------------- finite values


@pytest.mark.parametrize("value,bad", [
    (1.0, 0), (float("nan"), 1), (float("-inf"), 1), (torch.tensor([1.0, float("nan"), float("inf")]), 2),
    (torch.arange(5), 0), (np.array([np.inf, 1.0], dtype=np.float32), 1), (np.array([1, 2]), 0),
    ({"a": 1.0, "b": {"c": [2.0, float("nan")]}}, 1), (torch.tensor([1.0, 2.0], dtype=torch.bfloat16), 0), ("nan", 0), (None, 0),
])
def test_check_finite(value, bad):
    if bad:
        with pytest.raises(NonFiniteError) as e:
            V.check_finite("x", value)
        assert "x" in str(e.value) and "\n" not in str(e.value)
        n_bad = int((~torch.as_tensor(value).isfinite()).sum()) if isinstance(value, (torch.Tensor, np.ndarray)) else 1
        assert n_bad == bad
    else:
        V.check_finite("x", value)


# ----------------------------------------------------------------------------- disk space


def test_disk_space(tmp_path, monkeypatch):
    free = V.ensure_disk_space(tmp_path / "new" / "deeper", 1024)
    assert free == pytest.approx(os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize, rel=0.01)
    with pytest.raises(OutputError, match="not enough disk space"):
        V.ensure_disk_space(tmp_path / "out", free * 2)
    assert not (tmp_path / "out").exists()

    real = os.statvfs

    class ReadOnly:
        def __init__(self, st):
            self._st = st

        def __getattr__(self, k):
            return os.ST_RDONLY | self._st.f_flag if k == "f_flag" else getattr(self._st, k)

    monkeypatch.setattr(os, "statvfs", lambda p: ReadOnly(real(p)))
    with pytest.raises(OutputError, match="read-only file system"):
        V.ensure_disk_space(tmp_path / "out", 10)
    assert V.estimate_output_bytes(1000, lambda_elements=10, side_bytes=5) == 1045


# ----------------------------------------------------------------------------- config vs weights


def _params(model) -> dict:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def _tensors(model) -> dict:
    return {n: (tuple(t.shape), "F32") for n, t in model.state_dict().items()}


def _tiny_llama(layers: int, hidden: int = 32, tie: bool = True):
    import transformers as T

    cfg = T.LlamaConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=64, tie_word_embeddings=tie)
    return T.LlamaForCausalLM(cfg)


def _tied(model) -> set:
    return V.tied_parameter_names(model)


@pytest.mark.parametrize("config_layers,weight_layers,config_hidden,tie,fragment", [
    (2, 2, 32, True, None), (2, 2, 32, False, None),
    (3, 2, 32, True, "lacks"), (2, 3, 32, True, "does not describe"), (2, 2, 48, True, "has shape"),
])
def test_state_matches_agrees_with_strict_loading(config_layers, weight_layers, config_hidden, tie, fragment):
    """The check passes exactly when a strict ``load_state_dict`` of the weights into the config's model does."""
    skeleton, weights = _tiny_llama(config_layers, config_hidden, tie), _tiny_llama(weight_layers, 32, tie)
    state = weights.state_dict()
    try:
        skeleton.load_state_dict(state, strict=True)
        strict_ok = True
    except RuntimeError:
        strict_ok = False
    stored = {k: (tuple(v.shape), "F32") for k, v in state.items() if k not in _tied(weights)}  # tied: stored once
    assert strict_ok == (fragment is None)
    if fragment is None:
        V.check_state_matches(_params(skeleton), stored, _tied(skeleton))
    else:
        with pytest.raises(StateMismatchError, match=fragment):
            V.check_state_matches(_params(skeleton), stored, _tied(skeleton))


def test_state_matches_hub_prefix_and_buffers():
    import transformers as T

    model = T.GPT2LMHeadModel(T.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32))
    stored = {k.removeprefix("transformer."): (tuple(v.shape), "F32") for k, v in model.state_dict().items() if k != "lm_head.weight"}
    stored["h.0.attn.bias"] = ((1, 1, 8, 8), "BOOL")  # old checkpoints save the causal mask buffer
    V.check_state_matches(_params(model), stored, _tied(model), base_prefix="transformer")
    wte = stored["wte.weight"]
    stored["wte.weight"] = (wte[0], "I32")
    with pytest.raises(StateMismatchError, match="'wte.weight' is stored as I32"):
        V.check_state_matches(_params(model), stored, _tied(model), base_prefix="transformer")
    stored["wte.weight"] = wte
    del stored["h.0.mlp.c_fc.weight"]
    with pytest.raises(StateMismatchError, match="transformer.h.0.mlp.c_fc.weight"):
        V.check_state_matches(_params(model), stored, _tied(model), base_prefix="transformer")


# ----------------------------------------------------------------------------- safetensors headers


@pytest.fixture()
def st_file(tmp_path) -> Path:
    return small_safetensors(tmp_path / "model.safetensors")


def _mutate(header: dict, case: str):
    names = [k for k in header if k != "__metadata__"]
    a, b = sorted(names, key=lambda n: header[n]["data_offsets"][0])[:2]
    h = json.loads(json.dumps(header))
    if case == "overlap":  # b starts inside a, same length: still sums to the file size if a shrinks
        h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + (h[b]["data_offsets"][1] - h[b]["data_offsets"][0])]
    elif case == "offsets_strings":
        h[a]["data_offsets"] = [str(x) for x in h[a]["data_offsets"]]
    elif case == "offsets_bool":
        h[a]["data_offsets"] = [False, h[a]["data_offsets"][1]]
    elif case == "offsets_three":
        h[a]["data_offsets"] = h[a]["data_offsets"] + [0]
    elif case == "negative_shape":
        h[a]["shape"] = [-h[a]["shape"][0], -h[a]["shape"][1]]
    elif case == "float_shape":
        h[a]["shape"] = [float(s) for s in h[a]["shape"]]
    elif case == "unknown_dtype":
        h[a]["dtype"] = "F13"
    elif case == "nbytes":
        h[a]["shape"] = [h[a]["shape"][0] + 1] + h[a]["shape"][1:]
    elif case == "metadata_list":
        h["__metadata__"] = ["format", "pt"]
    elif case == "metadata_int_value":
        h["__metadata__"] = {"format": 1}
    elif case == "extra_key":
        h[a]["offset"] = 0
    elif case == "entry_list":
        h[a] = [h[a]["dtype"], h[a]["shape"], h[a]["data_offsets"]]
    return h


HEADER_CASES = [("overlap", "overlap"), ("offsets_strings", "data_offsets"), ("offsets_bool", "data_offsets"),
                ("offsets_three", "data_offsets"), ("negative_shape", "non-negative"), ("float_shape", "non-negative integers"),
                ("unknown_dtype", "unknown dtype 'F13'"), ("nbytes", "expected"), ("metadata_list", "__metadata__"),
                ("metadata_int_value", "__metadata__"), ("extra_key", "exactly dtype"), ("entry_list", "exactly dtype")]


@pytest.mark.parametrize("case,fragment", HEADER_CASES)
def test_header_mutations_refused(st_file, case, fragment):
    header, body = split_safetensors(st_file.read_bytes())
    st_file.write_bytes(join_safetensors(_mutate(header, case), body))
    with pytest.raises(SourceError) as e:
        read_header(st_file)
    assert fragment in str(e.value) and str(st_file) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("raw,fragment", [
    (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"), (b"[1, 2]", "list, not an object"), (b'"x"', "str, not an object"),
    (b"\xff\xfe{}", "not valid JSON"), (b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "a": 1}', "names 'a' twice"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, NaN]}}', "not valid JSON"),
])
def test_raw_header_refused(tmp_path, raw, fragment):
    f = tmp_path / "x.safetensors"
    f.write_bytes(join_safetensors(raw, b""))
    with pytest.raises(SourceError, match=fragment):
        read_header(f)


def test_layout_gap_trailing_truncated(st_file):
    header, body = split_safetensors(st_file.read_bytes())
    st_file.write_bytes(join_safetensors(header, body + b"\0" * 4))
    with pytest.raises(CorruptFileError, match="4 bytes after the last tensor"):
        read_header(st_file)
    st_file.write_bytes(join_safetensors(header, body[:-2]))
    with pytest.raises(SourceError, match="truncated"):
        read_header(st_file)
    h = json.loads(json.dumps(header))
    first = min((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    for k in h:
        if k != "__metadata__":
            h[k]["data_offsets"] = [x + 4 for x in h[k]["data_offsets"]]
    st_file.write_bytes(join_safetensors(h, b"\0" * 4 + body))
    with pytest.raises(CorruptFileError, match=f"4 unused bytes before tensor '{first}'"):
        read_header(st_file)


def test_valid_files_accepted_and_read_back(tmp_path, st_file):
    from safetensors import safe_open

    _, tensors = read_header(st_file)
    index = TensorIndex.open(st_file)
    with safe_open(str(st_file), "pt") as f:
        for name in f.keys():
            assert torch.equal(index.get(name), f.get_tensor(name))
    index.close()
    assert tensors["model.norm.weight"].dtype == "BF16"


@pytest.mark.parametrize("dtype,ok", [("F32", True), ("BF16", True), ("F16", True), ("F64", True), ("U32", False), ("I8", False), ("BOOL", False)])
def test_norm_weight_must_be_float(dtype, ok):
    if ok:
        require_float("model.norm.weight", dtype)
        V.check_norm_dtype("model.norm.weight", dtype)
    else:
        with pytest.raises(CorruptFileError, match=f"dtype {dtype}; norm weights must be float"):
            V.check_norm_dtype("model.norm.weight", dtype)


# ----------------------------------------------------------------------------- shard indexes


@pytest.fixture()
def sharded(tmp_path) -> Path:
    from models import tiny_hf

    d = tmp_path / "sharded"
    tiny_hf("gpt2").save_pretrained(d, max_shard_size="20KB")
    assert (d / INDEX_NAME).exists()
    return d


def _rewrite_index(d: Path, fn) -> None:
    idx = json.loads((d / INDEX_NAME).read_text())
    (d / INDEX_NAME).write_text(json.dumps(fn(idx)))


@pytest.mark.parametrize("edit,fragment", [
    (lambda i: {**i, "weight_map": list(i["weight_map"].items())}, "no weight_map object"),
    (lambda i: [i], "no weight_map object"),
    (lambda i: {**i, "weight_map": {**i["weight_map"], next(iter(i["weight_map"])): "/etc/passwd"}}, "outside its directory"),
    (lambda i: {**i, "weight_map": {**i["weight_map"], next(iter(i["weight_map"])): "../model.safetensors"}}, "outside its directory"),
    (lambda i: {**i, "weight_map": {**i["weight_map"], next(iter(i["weight_map"])): 3}}, "not a file name"),
    (lambda i: {**i, "weight_map": {**i["weight_map"], next(iter(i["weight_map"])): "gone.safetensors"}}, "missing shard: 'gone.safetensors'"),
    (lambda i: {**i, "weight_map": {}}, "empty weight_map"),
    (lambda i: {**i, "weight_map": dict(list(i["weight_map"].items())[1:])}, "does not list 1 tensor(s) its shards hold"),
])
def test_index_refused(sharded, edit, fragment):
    _rewrite_index(sharded, edit)
    with pytest.raises(SourceError) as e:
        TensorIndex.open(sharded)
    assert fragment in str(e.value), str(e.value)


def test_index_never_opens_outside_files(sharded, monkeypatch):
    opened = []
    real_open = open

    def spy(file, *a, **k):
        opened.append(str(file))
        return real_open(file, *a, **k)

    _rewrite_index(sharded, lambda i: {**i, "weight_map": {**i["weight_map"], "x": "/etc/passwd"}})
    monkeypatch.setattr("builtins.open", spy)
    with pytest.raises(CorruptFileError):
        TensorIndex.open(sharded)
    assert not [p for p in opened if not p.startswith(str(sharded))]


def test_tensor_in_two_shards(sharded):
    shards = sorted(sharded.glob("*.safetensors"))
    first_header, _ = split_safetensors(shards[0].read_bytes())
    dup = next(k for k in first_header if k != "__metadata__")
    extra = sharded / "extra.safetensors"
    from safetensors.torch import save_file

    shape = first_header[dup]["shape"]
    save_file({dup: torch.zeros(shape)}, str(extra))
    _rewrite_index(sharded, lambda i: {**i, "weight_map": {**i["weight_map"], "other": "extra.safetensors"}})
    with pytest.raises(CorruptFileError, match=f"{dup!r} is stored in both"):
        TensorIndex.open(sharded)


# ----------------------------------------------------------------------------- manifests, inspect, eval on a converted model


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    import ibnorm
    from models import tiny_hf

    root = tmp_path_factory.mktemp("conv")
    tiny_hf("llama").save_pretrained(root / "src")
    ibnorm.convert_checkpoint(str(root / "src"), root / "out", ibnorm.ConvertOptions(lam=0.1))
    return root / "out"


def _copy(converted: Path, tmp_path: Path) -> Path:
    import shutil

    d = tmp_path / "c"
    shutil.copytree(converted, d)
    return d


@pytest.mark.parametrize("edit,fragment", [
    (lambda m: [m], "must be a JSON object, not list"),
    (lambda m: {k: v for k, v in m.items() if k != "layers"}, "lacks the field 'layers'"),
    (lambda m: {**m, "layers": {"a": 1}}, "'layers' must be a list"),
    (lambda m: {**m, "source": "x"}, "'source' must be an object"),
    (lambda m: {**m, "source": {"name": "x"}}, "source lacks the field 'resolved'"),
    (lambda m: {**m, "family": "onnx"}, "family 'onnx'"),
    (lambda m: {**m, "layers": [{**m["layers"][0], "lam_shape": [-1]}]}, "lam_shape"),
    (lambda m: {**m, "layers": [{**m["layers"][0], "lam_mean": "0.1"}]}, "'lam_mean' must be a number"),
    (lambda m: {**m, "layers": [m["layers"][0], m["layers"][0]]}, "listed twice"),
    (lambda m: {**m, "layers": [{**m["layers"][0], "lam_mean": float("nan")}]}, "not finite"),
    (lambda m: {**m, "evaluation": {"source": 1.0, "converted": float("inf")}}, "evaluation.converted is inf"),
    (lambda m: {**m, "format": "other/1"}, "unsupported format"),
    (lambda m: {**m, "task": "seq2seq"}, "task 'seq2seq'"),
    (lambda m: {**m, "options": {**m["options"], "op": "relu"}}, "options.op 'relu'"),
    (lambda m: {**m, "layers": [{**m["layers"][0], "grouping": "instance"}]}, "grouping 'instance'"),
])
def test_manifest_schema(converted, edit, fragment):
    manifest = read_manifest(converted)
    validate_manifest(json.loads(json.dumps(manifest)))
    with pytest.raises(SourceError) as e:
        validate_manifest(edit(json.loads(json.dumps(manifest))), "m.json")
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_manifest_enums_match_the_library():
    import ibnorm
    from ibnorm.io import manifest as M
    from ibnorm.spec import GROUPINGS

    assert set(M.OPS) == set(ibnorm.COMPRESSION_OPS) and set(M.GROUPINGS) == set(GROUPINGS)


def test_manifest_not_utf8(converted, tmp_path):
    d = _copy(converted, tmp_path)
    (d / "ibnorm_manifest.json").write_bytes(b'{"format": "\xff"}')
    with pytest.raises(CorruptFileError, match="not UTF-8"):
        read_manifest(d)


def _set_tensor_bytes(path: Path, name: str, dtype: str | None = None, values: np.ndarray | None = None) -> None:
    header, body = split_safetensors(path.read_bytes())
    b, e = header[name]["data_offsets"]
    body = bytearray(body)
    if values is not None:
        body[b:e] = values.tobytes()
    if dtype is not None:
        header[name]["dtype"] = dtype
    path.write_bytes(join_safetensors(header, bytes(body)))


def test_inspect_damage_exits_nonzero(converted, tmp_path):
    from ibnorm.inspect import inspect_checkpoint

    assert inspect_checkpoint(converted)["problems"] == []
    d = _copy(converted, tmp_path)
    st = d / "model.safetensors"
    norm = "model.norm.weight"
    _set_tensor_bytes(st, norm, dtype="U32")  # same itemsize: only the dtype changes
    assert any("dtype U32, norm tensors must be float" in p for p in inspect_checkpoint(d)["problems"])
    r = run_cli("inspect", str(d))
    assert r.exit_code == 1 and "norm tensors must be float" in r.stdout
    _set_tensor_bytes(st, norm, dtype="F32", values=np.full(32, np.nan, np.float32))
    r = run_cli("inspect", str(d), "--json")
    assert r.exit_code == 1 and any("NaN/Inf" in p for p in json.loads(r.stdout)["problems"])
    # manifest and weights disagree about a λ shape
    d2 = _copy(converted, tmp_path / "b")
    m = json.loads((d2 / "ibnorm_manifest.json").read_text())
    m["layers"][0]["lam_shape"] = [7]
    (d2 / "ibnorm_manifest.json").write_text(json.dumps(m))
    assert any("the manifest says [7]" in p for p in inspect_checkpoint(d2)["problems"])
    assert run_cli("inspect", str(d2)).exit_code == 1


@pytest.mark.parametrize("case,fragment", [("overlap", "overlap"), ("negative_shape", "non-negative"), ("offsets_strings", "data_offsets")])
def test_inspect_cli_refuses_bad_headers(st_file, case, fragment):
    header, body = split_safetensors(st_file.read_bytes())
    st_file.write_bytes(join_safetensors(_mutate(header, case), body))
    assert_clean_refusal(run_cli("inspect", str(st_file)), fragment)


@pytest.fixture(scope="module")
def text_models(tmp_path_factory) -> dict:
    """A tiny GPT-2 LM (64 positions) and a tiny BERT encoder sharing its tokenizer."""
    import shutil

    import transformers as T

    from models import tiny_lm_with_tokenizer

    root = tmp_path_factory.mktemp("textmodels")
    lm = tiny_lm_with_tokenizer(root / "lm", kind="gpt2")
    config = T.GPT2Config.from_pretrained(lm)
    config.n_positions = 64  # a short position table: --seq-len above it must be refused
    torch.manual_seed(0)
    T.GPT2LMHeadModel(config).save_pretrained(lm)
    cfg = json.loads((lm / "config.json").read_text())
    enc = root / "enc"
    T.BertModel(T.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             vocab_size=cfg["vocab_size"], max_position_embeddings=64)).save_pretrained(enc)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(lm / f, enc / f)
    text = root / "text.txt"
    from ibnorm.data import read_texts

    text.write_text("\n".join(read_texts("builtin:pydoc:eval")[:20]))
    return {"lm": lm, "enc": enc, "text": text}


@pytest.mark.parametrize("args,fragment", [
    (("--seq-len", "0"), "--seq-len must be ≥ 2"), (("--seq-len", "1"), "--seq-len must be ≥ 2"),
    (("--seq-len", "65"), "exceeds the model's 64 positions"), (("--compare", "{enc}", "--seq-len", "32"), "cannot compare"),
])
def test_eval_cli_refusals(text_models, args, fragment):
    args = tuple(a.format(**text_models) for a in args)
    assert_clean_refusal(run_cli("eval", str(text_models["lm"]), "--data", str(text_models["text"]), "--max-tokens", "256", *args), fragment)


def test_eval_refuses_nan_perplexity(text_models, tmp_path):
    import shutil

    d = tmp_path / "nan-lm"
    shutil.copytree(text_models["lm"], d)
    _set_tensor_bytes(d / "model.safetensors", "transformer.ln_f.weight", values=np.full(32, np.nan, np.float32))
    r = run_cli("eval", str(d), "--data", str(text_models["text"]), "--seq-len", "32", "--max-tokens", "128")
    assert_clean_refusal(r, "NaN or infinite")  # refused when loading, before any perplexity is computed
    ok = run_cli("eval", str(text_models["lm"]), "--data", str(text_models["text"]), "--seq-len", "32", "--max-tokens", "128", "--json")
    assert ok.exit_code == 0 and math.isfinite(json.loads(ok.stdout)["value"])


def test_compare_results_of_different_kinds():
    from ibnorm.evaluate import check_comparable, compare

    with pytest.raises(OptionError, match="cannot compare"):
        compare({"metric": "perplexity", "value": 3.0}, {"metric": "embedding", "_embeddings": torch.zeros(1, 4)})
    with pytest.raises(OptionError, match="causal-lm"):
        check_comparable("causal-lm", "encoder")
    with pytest.raises(NonFiniteError):
        compare({"metric": "perplexity", "value": 3.0, "tokens": 1, "window": 2, "stride": 1},
                {"metric": "perplexity", "value": float("nan")})


# ----------------------------------------------------------------------------- calibration data


def _png(path: Path, color=(200, 10, 10)) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8), color).save(path)


@pytest.mark.parametrize("make,fragment", [
    (lambda d: (d / "a.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "bad \xff"}\n'), "a.jsonl:2: not UTF-8"),
    (lambda d: (d / "a.jsonl").write_bytes(b'{"text": "ok"}\n[1]\n'), "a.jsonl:2: no 'text' field"),
    (lambda d: (d / "a.jsonl").write_bytes(b'{"text": 3}\n'), "is a int, not text"),
    (lambda d: (d / "a.jsonl").write_bytes(b"\n\n"), "no text found"),
    (lambda d: (d / "a.txt").write_bytes(b"caf\xe9"), "not UTF-8 text"),
    (lambda d: (d / "a.txt").write_bytes(b"   \n"), "no text found"),
])
def test_text_data_refused(tmp_path, make, fragment):
    from ibnorm.data import DataError, check_text_data

    make(tmp_path)
    target = next(tmp_path.iterdir())
    with pytest.raises(DataError) as e:
        check_text_data(str(target))
    assert fragment in str(e.value), str(e.value)


def test_image_data_refused(tmp_path):
    from ibnorm.data import DataError, check_images, image_folder, load_images

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        _png(tmp_path / c / "1.png")
    assert check_images(image_folder(str(tmp_path))) == 2
    good = (tmp_path / "cat" / "1.png").read_bytes()
    (tmp_path / "dog" / "2.png").write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(DataError, match="2.png: not a readable image"):
        check_images(image_folder(str(tmp_path)))
    (tmp_path / "dog" / "2.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match="not a readable image"):
        load_images(image_folder(str(tmp_path)), lambda im: torch.zeros(3))
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        image_folder(str(empty))


@pytest.mark.parametrize("seq_len,max_blocks,fragment", [(0, 4, "positive number of tokens"), (8, -5, "≥ 1"), (8, 0, "≥ 1"),
                                                          (10**6, 2, "not enough text")])
def test_token_examples_refused(seq_len, max_blocks, fragment):
    from ibnorm.data import DataError, token_examples

    tokenizer = lambda text, add_special_tokens=False: {"input_ids": [ord(c) % 50 for c in text]}  # noqa: E731
    tokenizer.eos_token_id = 0
    with pytest.raises(DataError, match=fragment):
        token_examples(tokenizer, ["hello world " * 20], seq_len, max_blocks)


# ----------------------------------------------------------------------------- atomic output directories


def test_atomic_success_mode_and_no_leftovers(tmp_path):
    from safetensors.torch import save_file

    out = tmp_path / "a" / "b" / "out"
    with atomic.atomic_directory(out, force=False) as tmp:
        assert (tmp / atomic.MARKER).is_file()
        save_file({"x": torch.zeros(2)}, str(tmp / "model.safetensors"))  # safetensors creates 0600
        (tmp / "sub").mkdir()
        (tmp / "sub" / "f.txt").write_text("x")
    mask = atomic.current_umask()
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (out / "sub").stat().st_mode & 0o777 == 0o777 & ~mask
    assert tree(out.parent) == ["out", "out/model.safetensors", "out/sub", "out/sub/f.txt"]


def test_atomic_failure_removes_tmp_and_created_parents(tmp_path):
    out = tmp_path / "new1" / "new2" / "out"
    with pytest.raises(RuntimeError):
        with atomic.atomic_directory(out, force=False) as tmp:
            (tmp / "w").write_bytes(b"x")
            raise RuntimeError("boom")
    assert tree(tmp_path) == []
    with pytest.raises(OutputError, match="cannot write .*No space left"):
        with atomic.atomic_directory(out, force=False) as tmp:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "model.safetensors"))
    assert tree(tmp_path) == []


def test_atomic_force_replaces_and_keeps_on_failure(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="--force"):
        with atomic.atomic_directory(out, force=False):
            pass
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_directory(out, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert tree(tmp_path) == ["out", "out/old.txt"]
    with atomic.atomic_directory(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert tree(tmp_path) == ["out", "out/new.txt"]


@pytest.mark.parametrize("out_rel,source_rel,fragment", [
    ("src", "src", "inside the source"), ("src/sub", "src", "inside the source"), (".", "src", "current directory"),
    ("", None, "current directory"), ("parent", "parent/src", "contains the source"), ("w.gguf", "w.gguf", "inside the source"),
])
def test_out_overlapping_source_or_cwd(tmp_path, monkeypatch, out_rel, source_rel, fragment):
    (tmp_path / "src").mkdir()
    (tmp_path / "parent" / "src").mkdir(parents=True)
    (tmp_path / "w.gguf").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    with pytest.raises(OutputError, match=fragment):
        with atomic.atomic_directory(out_rel or os.getcwd(), force=True, source=source_rel):
            pass
    assert tree(tmp_path) == before


def test_out_beside_a_file_source_is_fine(tmp_path):
    (tmp_path / "w.gguf").write_bytes(b"x")
    with atomic.atomic_directory(tmp_path / "converted", force=False, source=tmp_path / "w.gguf") as tmp:
        (tmp / "f").write_text("1")
    assert (tmp_path / "converted" / "f").exists()


_CHILD = """
import sys, time, pathlib
from ibnorm.io.atomic import atomic_directory
out = pathlib.Path(sys.argv[1])
with atomic_directory(out, force=False) as tmp:
    (tmp / "part.safetensors").write_bytes(b"x" * 1000)
    print("ready", flush=True)
    time.sleep(30)
"""


def _start_child(out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1])] + sys.path)}
    p = subprocess.Popen([sys.executable, "-c", _CHILD, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "ready", p.stderr.read()
    return p


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    out = tmp_path / "deep" / "out"
    p = _start_child(out)
    assert any(atomic.MARKER in e for e in tree(tmp_path))
    p.send_signal(signal.SIGTERM)
    p.wait(timeout=20)
    assert p.returncode != 0
    assert tree(tmp_path) == []  # no temporary directory, no created parent


def test_sigkill_leftovers_removed_by_the_next_run_and_by_clean(tmp_path):
    out = tmp_path / "out"
    first = _start_child(out)
    first.kill()
    first.wait(timeout=20)
    left = [e for e in tree(tmp_path) if "/" not in e]
    assert len(left) == 1 and left[0].startswith(f".out.tmp-{first.pid}-")
    second = _start_child(out)  # a later run next to the killed one removes its leftovers first
    second.kill()
    second.wait(timeout=20)
    stale = [e for e in tree(tmp_path) if "/" not in e]
    assert len(stale) == 1 and stale[0].startswith(f".out.tmp-{second.pid}-")
    # a live run's directory (this process) and a directory without a marker are never touched
    live = tmp_path / f".x.tmp-{os.getpid()}-abc"
    live.mkdir()
    (live / atomic.MARKER).write_text(json.dumps({"pid": os.getpid(), "start": atomic.process_start_time(os.getpid())}))
    foreign = tmp_path / ".y.tmp-1-zzz"
    foreign.mkdir()
    report = atomic.clean(tmp_path, dry_run=True)
    assert [Path(r).name for r in report.removed] == stale and report.kept_running == [str(live)]
    assert len([e for e in tree(tmp_path) if "/" not in e]) == 3  # a dry run removes nothing
    r = run_cli("clean", str(tmp_path), "--json")
    assert r.exit_code == 0 and [Path(p).name for p in json.loads(r.stdout)["removed"]] == stale
    assert sorted(e for e in tree(tmp_path) if "/" not in e) == sorted([live.name, foreign.name])
    with atomic.atomic_directory(out, force=False) as tmp:
        (tmp / "f").write_text("1")
    assert sorted(e for e in tree(tmp_path) if "/" not in e) == sorted(["out", live.name, foreign.name])


def test_reused_pid_counts_as_dead(tmp_path):
    d = tmp_path / f".o.tmp-{os.getpid()}-aaa"
    d.mkdir()
    (d / atomic.MARKER).write_text(json.dumps({"pid": os.getpid(), "start": atomic.process_start_time(os.getpid()) - 1000}))
    assert atomic.is_stale(d)


def test_errors_are_one_line_subclasses():
    for cls in (OptionError, CorruptFileError, StateMismatchError, NonFiniteError, OutputError):
        assert issubclass(cls, IBNormError)
    assert one_error_line("error: x\n") == "error: x"


# ----------------------------------------------------------------------------- HF checkpoints: config vs weights, norm tensors


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory) -> dict:
    from models import tiny_hf

    root = tmp_path_factory.mktemp("hfdirs")
    tiny_hf("llama").save_pretrained(root / "llama")
    tiny_hf("gpt2").save_pretrained(root / "gpt2-sharded", max_shard_size="20KB")
    tiny_hf("qwen3").save_pretrained(root / "qwen3")
    return root


@pytest.mark.parametrize("name", ["llama", "gpt2-sharded", "qwen3"])
def test_hf_checkpoint_clean(hf_dirs, name):
    V.check_hf_checkpoint(hf_dirs / name)


def _edited_copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("case,error,fragment", [
    ("more_layers", StateMismatchError, "lacks 9 parameter(s) the config describes, e.g. 'model.layers.2."),
    ("fewer_layers", StateMismatchError, "does not describe, e.g. 'model.layers.1."),
    ("wider", StateMismatchError, "has shape"),
    ("u32_norm", SourceError, "must be float"),
    ("nan_norm", NonFiniteError, "'model.norm.weight' has 32 of 32 values NaN"),
    ("config_junk", SourceError, "is not a valid config"),
    ("config_list", SourceError, "not a config object"),
    ("config_heads", SourceError, ""),
])
def test_hf_checkpoint_refused(hf_dirs, tmp_path, case, error, fragment):
    d = _edited_copy(hf_dirs / "llama", tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    st = d / "model.safetensors"
    if case in ("more_layers", "fewer_layers"):
        cfg["num_hidden_layers"] += 1 if case == "more_layers" else -1
    elif case == "wider":
        cfg["intermediate_size"] = 65
    elif case == "u32_norm":
        _set_tensor_bytes(st, "model.norm.weight", dtype="U32")
    elif case == "nan_norm":
        _set_tensor_bytes(st, "model.norm.weight", values=np.full(32, np.nan, np.float32))
    elif case == "config_junk":
        cfg["num_hidden_layers"] = [1, 2]
    elif case == "config_heads":
        cfg["num_attention_heads"] = 5  # does not divide the width
    (d / "config.json").write_text(json.dumps([cfg] if case == "config_list" else cfg))
    with pytest.raises(error) as e:
        V.check_hf_checkpoint(d)
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


# ----------------------------------------------------------------------------- fine-tune resume belongs to this run


def test_resume_fingerprint(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "ibnorm_manifest.json").write_text('{"a": 1}')
    opts = {"lr": 1e-3, "seq_len": 32, "train": "norms", "steps": 10, "resume": False, "out": "x"}
    fp = V.run_fingerprint(model, opts, ["text one", "text two"])
    # what does not change the trajectory does not change the fingerprint
    assert V.run_fingerprint(model, {**opts, "steps": 20, "resume": True, "out": "y"}, ["text one", "text two"]) == fp
    for other in (V.run_fingerprint(model, {**opts, "lr": 2e-3}, ["text one", "text two"]),
                  V.run_fingerprint(model, opts, ["text one", "text 2"]),
                  V.run_fingerprint(tmp_path, opts, ["text one", "text two"])):
        assert other != fp
    V.check_resume("ck", {"step": 3, "fingerprint": fp}, fp)
    for progress, fragment in (({"step": 3, "fingerprint": "0" * 64}, "belongs to another run"), ({"step": 3}, "another run"),
                               ([1, 2], "damaged"), ({"step": "3", "fingerprint": fp}, "damaged"), (None, "damaged")):
        with pytest.raises(StateMismatchError, match=fragment):
            V.check_resume("ck", progress, fp)


def test_read_checkpoint_and_trainer_state(tmp_path):
    from safetensors.torch import save_file

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    ck = tmp_path / "step-0000002"
    ck.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ck / "model.safetensors"))
    (ck / "progress.json").write_text(json.dumps({"step": 2, "fingerprint": "f" * 64}))
    opt = torch.optim.AdamW(model.parameters())
    torch.save({"optimizer": opt.state_dict(), "rng": {"torch": torch.get_rng_state()}}, ck / "trainer_state.pt")
    assert V.read_checkpoint(ck, "f" * 64, params)["step"] == 2
    assert set(V.load_trainer_state(ck / "trainer_state.pt")) == {"optimizer", "rng"}
    other = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))  # another model's checkpoint
    with pytest.raises(StateMismatchError, match="has shape"):
        V.read_checkpoint(ck, "f" * 64, {n: tuple(p.shape) for n, p in other.named_parameters()})
    with pytest.raises(StateMismatchError, match="another run"):
        V.read_checkpoint(ck, "0" * 64, params)
    data = (ck / "trainer_state.pt").read_bytes()
    (ck / "trainer_state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(StateMismatchError, match="damaged"):
        V.load_trainer_state(ck / "trainer_state.pt")
    (ck / "model.safetensors").write_bytes(b"junk" * 10)
    with pytest.raises(StateMismatchError, match="not a usable checkpoint"):
        V.read_checkpoint(ck, "f" * 64, params)
    (ck / "progress.json").write_bytes(b"\xff")
    with pytest.raises(StateMismatchError, match="progress.json is missing or damaged"):
        V.read_checkpoint(ck, "f" * 64, params)
