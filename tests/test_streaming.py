"""Streaming (block-by-block, from the shards) conversion equals whole-model conversion."""

import json
from pathlib import Path

import pytest
import torch

import ibnorm
from ibnorm.errors import IBNormError
from ibnorm.io.safetensors_index import TensorIndex
from models import tiny_lm_with_tokenizer


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def sharded(request, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp(request.param) / "src"
    tiny_lm_with_tokenizer(d, kind=request.param, max_shard_size="30KB")
    assert len(list(d.glob("*.safetensors"))) > 1
    return d


@pytest.mark.parametrize("mode", ["fixed", "data-free", "calibrated"])
def test_streamed_equals_whole_model(sharded, tmp_path, mode):
    opts = {"fixed": dict(lam=0.25), "data-free": {},
            "calibrated": dict(calib="builtin:pydoc:train", calib_samples=4, seq_len=64, budget=float("inf"))}[mode]
    ibnorm.convert_checkpoint(str(sharded), tmp_path / "whole", ibnorm.ConvertOptions(**opts), stream="never")
    _, manifest = ibnorm.convert_checkpoint(str(sharded), tmp_path / "stream", ibnorm.ConvertOptions(**opts), stream="always",
                                            shard_size="40KB")
    assert manifest["calibration"]["streaming"] and len(manifest["shards"]) > 1
    src, out = TensorIndex.open(sharded), TensorIndex.open(tmp_path / "stream")
    index = json.loads((tmp_path / "stream" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(out.tensors)  # the index maps every tensor
    norm_modules = {l["name"] for l in manifest["layers"]}
    for name in src.tensors:
        if name.rsplit(".", 1)[0] not in norm_modules:  # copied tensors: same dtype, same bytes
            assert src.tensors[name].dtype == out.tensors[name].dtype
            assert torch.equal(src.get(name), out.get(name)), name
    whole, streamed = ibnorm.load(tmp_path / "whole"), ibnorm.load(tmp_path / "stream")
    sw, ss = whole.state_dict(), streamed.state_dict()
    assert set(sw) == set(ss)
    for k in sw:
        torch.testing.assert_close(sw[k], ss[k], rtol=1e-6, atol=1e-6)
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(whole(input_ids=ids).logits, streamed(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_index_naming_a_missing_shard(sharded, tmp_path):
    bad = _copy(sharded, tmp_path / "bad")
    sorted(bad.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(IBNormError, match="missing shard"):
        ibnorm.convert_checkpoint(str(bad), tmp_path / "out", ibnorm.ConvertOptions(lam=0.1), stream="always")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_shard_missing_a_tensor(sharded, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = _copy(sharded, tmp_path / "bad")
    shard = sorted(bad.glob("model-*.safetensors"))[0]
    tensors = load_file(str(shard))
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(IBNormError, match="does not contain it"):
        ibnorm.convert_checkpoint(str(bad), tmp_path / "out", ibnorm.ConvertOptions(lam=0.1), stream="always")
    assert not (tmp_path / "out").exists()


def test_auto_mode_refuses_unstreamable_model_that_does_not_fit(tmp_path, monkeypatch):
    import psutil
    import transformers

    d = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                   intermediate_size=64, vocab_size=100)).save_pretrained(d)

    class Tiny:
        available = 1000

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Tiny())
    with pytest.raises(IBNormError, match=r"needs about .* GiB.*cannot be streamed"):
        ibnorm.convert_checkpoint(str(d), tmp_path / "out", ibnorm.ConvertOptions(lam=0.1))
    assert not (tmp_path / "out").exists()


def test_streamed_and_in_memory_measure_the_same_drift_and_back_off(sharded, tmp_path):
    """The end-to-end check holds when streaming: same drift, same back-off, and the drift it reports is
    the drift of the model it wrote (measured here independently, by whole-model forward passes)."""
    import transformers

    from ibnorm.data import read_texts, token_examples

    base = dict(calib="builtin:pydoc:train", calib_samples=4, seq_len=64, tolerance=0.01)
    _, free = ibnorm.convert_checkpoint(str(sharded), tmp_path / "free", ibnorm.ConvertOptions(**base, budget=float("inf")),
                                        stream="never")
    budget = free["end_to_end"]["value"] / 3  # forces a back-off
    _, whole = ibnorm.convert_checkpoint(str(sharded), tmp_path / "whole", ibnorm.ConvertOptions(**base, budget=budget),
                                         stream="never")
    _, streamed = ibnorm.convert_checkpoint(str(sharded), tmp_path / "stream", ibnorm.ConvertOptions(**base, budget=budget),
                                            stream="always", shard_size="40KB")
    w, s = whole["end_to_end"], streamed["end_to_end"]
    assert w["backoff_factor"] < 1.0 and s["backoff_factor"] == w["backoff_factor"]
    assert s["value"] == pytest.approx(w["value"], rel=1e-4, abs=1e-9)
    assert s["within_budget"] == w["within_budget"] == (w["value"] <= budget)

    tokenizer = transformers.AutoTokenizer.from_pretrained(sharded)
    check = token_examples(tokenizer, read_texts("builtin:pydoc:train"), 64, 4)[:2]  # the check samples
    source = transformers.AutoModelForCausalLM.from_pretrained(sharded).eval()
    with torch.no_grad():
        logp = torch.log_softmax(source(input_ids=check).logits.float(), -1)
        for out in ("whole", "stream"):
            logq = torch.log_softmax(ibnorm.load(tmp_path / out)(input_ids=check).logits.float(), -1)
            kl = float((logp.exp() * (logp - logq)).sum(-1).mean())
            assert kl == pytest.approx(w["value"], rel=1e-3, abs=1e-7)


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_copied_tensors_are_the_source_bytes_with_or_without_copy_file_range(sharded, tmp_path, monkeypatch, kernel_copy):
    # Tensors that are not norms are copied file to file (os.copy_file_range), or through one read
    # and write where that call is missing or refused: both give the source's bytes.
    from ibnorm.io import stream_writer

    monkeypatch.setattr(stream_writer, "_KERNEL_COPY", [kernel_copy])
    if not kernel_copy:
        monkeypatch.delattr(stream_writer.os, "copy_file_range", raising=False)
    _, manifest = ibnorm.convert_checkpoint(str(sharded), tmp_path / "out", ibnorm.ConvertOptions(lam=0.25),
                                            stream="always", shard_size="40KB")
    src, out = TensorIndex.open(sharded), TensorIndex.open(tmp_path / "out")
    norms = {l["name"] for l in manifest["layers"]}
    copied = [n for n in src.tensors if n.rsplit(".", 1)[0] not in norms]
    assert copied
    for name in copied:
        assert src.read_bytes(name) == out.read_bytes(name), name


def test_copy_from_a_truncated_source_is_a_source_error(tmp_path):
    from ibnorm.errors import SourceError
    from ibnorm.io.stream_writer import PlannedTensor, ShardedWriter

    src = tmp_path / "src.bin"
    src.write_bytes(b"\1" * 10)
    (tmp_path / "out").mkdir()
    writer = ShardedWriter(tmp_path / "out", [PlannedTensor("t", "F32", (4,))], 1 << 20)
    import os

    fd = os.open(src, os.O_RDONLY)
    try:
        with pytest.raises(SourceError, match="truncated"):
            writer.copy("t", "F32", (4,), fd, 0)
    finally:
        os.close(fd)


def test_capture_stops_each_block_at_its_last_norm_and_converts_the_same(tmp_path, monkeypatch):
    # The capture pass stops every block once the norm it calls last has run (the MLP after a Llama
    # block's second norm is skipped); the captured inputs, and so the conversion, are unchanged.
    from transformers.models.llama import modeling_llama

    from ibnorm.pipeline import calibrate

    src = tiny_lm_with_tokenizer(tmp_path / "src")
    calls = []
    original = modeling_llama.LlamaMLP.forward
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", lambda self, x: calls.append(1) or original(self, x))
    opts = ibnorm.ConvertOptions(calib="builtin:pydoc:train", calib_samples=32, seq_len=32, budget=float("inf"))
    ibnorm.convert_checkpoint(str(src), tmp_path / "early", opts, stream="never")
    early = len(calls)
    monkeypatch.setattr(calibrate, "last_called", lambda order, names: None)  # capture runs whole blocks
    calls.clear()
    ibnorm.convert_checkpoint(str(src), tmp_path / "whole", opts, stream="never")
    blocks, batches, check_batches = 2, 32 // 4, 2
    assert early == blocks * (check_batches + batches)  # per block: the check batches' source pass, the converted pass
    assert len(calls) == early + blocks * batches  # plus a whole capture pass per block
    a, b = TensorIndex.open(tmp_path / "early"), TensorIndex.open(tmp_path / "whole")
    assert set(a.tensors) == set(b.tensors)
    assert all(a.read_bytes(n) == b.read_bytes(n) for n in a.tensors)
