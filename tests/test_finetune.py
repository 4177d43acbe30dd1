"""ibnorm finetune: data handling, exact resume, NaN stop, output format, 2-process equivalence."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ibnorm
from ibnorm.errors import IBNormError
from ibnorm.finetune import FinetuneOptions, finetune, global_batch_indices
from models import tiny_lm_with_tokenizer


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ft")
    src = tiny_lm_with_tokenizer(root / "src")
    out = root / "conv"
    ibnorm.convert_checkpoint(str(src), out, ibnorm.ConvertOptions(lam=0.1))
    return out


def _opts(tmp_path, **kw) -> FinetuneOptions:
    base = dict(data="builtin:pydoc:train", eval_data="builtin:pydoc:eval", steps=12, seq_len=32, batch_size=4,
                eval_every=6, eval_blocks=4, lr=5e-3, warmup=2, train="all", compare_source=False, out=str(tmp_path / "out"))
    base.update(kw)
    return FinetuneOptions(**base)


def test_data_order_is_a_function_of_step():
    a = global_batch_indices(5, 1, 37, 8, 2, seed=3)
    b = global_batch_indices(5, 1, 37, 8, 2, seed=3)
    assert torch.equal(a, b) and a.max() < 37
    # every block once per epoch
    seen = torch.cat([global_batch_indices(s, 0, 40, 8, 1, seed=0) for s in range(5)])
    assert sorted(seen.tolist()) == list(range(40))


def test_output_loads_and_records_finetune(converted, tmp_path):
    result = finetune(str(converted), _opts(tmp_path, train="norms"))
    out = Path(result.out)
    assert len(result.losses) == 12 and all(torch.isfinite(torch.tensor(result.losses)))
    assert [e["step"] for e in result.evals] == [0, 6, 12]
    model = ibnorm.load(out)
    assert all(m.effective_lam.min() >= 0 for m in model.modules() if isinstance(m, ibnorm.IBNormBase))
    manifest = json.loads((out / "ibnorm_manifest.json").read_text())
    assert manifest["finetune"]["steps"] == 12 and manifest["finetune"]["train"] == "norms"
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"step": 1, "loss": result.losses[0]}
    # λ was learnable: at least one layer moved
    assert any(abs(t[-1] - t[0]) > 0 for t in result.lambda_trajectory.values())
    from ibnorm.inspect import inspect_checkpoint

    assert inspect_checkpoint(out)["manifest"]["finetune"]["steps"] == 12


def test_norms_mode_trains_only_norms(converted, tmp_path):
    before = ibnorm.load(converted).state_dict()
    finetune(str(converted), _opts(tmp_path, train="norms", steps=3))
    after = ibnorm.load(tmp_path / "out").state_dict()
    changed = {k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])}
    assert changed and all("norm" in k for k in changed)


def test_resume_continues_exactly(converted, tmp_path):
    full = finetune(str(converted), _opts(tmp_path / "a"))

    def interrupt_at_7(event):
        if event.get("event") == "step" and event["step"] == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(str(converted), _opts(tmp_path / "b", save_every=5), interrupt_at_7)
    ckpts = sorted((tmp_path / "b" / "out-checkpoints").glob("step-*"))
    assert ckpts[-1].name == "step-0000007"  # saved on interrupt
    resumed = finetune(str(converted), _opts(tmp_path / "b", resume=True))
    assert resumed.losses == full.losses  # bit-identical loss sequence


def test_nan_loss_stops_with_clear_message(converted, tmp_path):
    with pytest.raises(IBNormError, match="loss became"):
        finetune(str(converted), _opts(tmp_path, lr=1e12, clip=0.0, warmup=1, steps=30))
    assert not (tmp_path / "out").exists()


def test_bad_data_fails_before_work(converted, tmp_path):
    with pytest.raises(IBNormError, match="data not found"):
        finetune(str(converted), _opts(tmp_path, data=str(tmp_path / "missing.txt")))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(IBNormError, match="no text"):
        finetune(str(converted), _opts(tmp_path, data=str(empty)))
    assert not (tmp_path / "out").exists()


def test_jsonl_and_parquet_data(converted, tmp_path):
    from ibnorm.data import read_texts

    docs = read_texts("builtin:pydoc:train")[:5]
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    assert read_texts(str(jl), "body") == docs
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), tmp_path / "d.parquet")
    assert read_texts(str(tmp_path / "d.parquet")) == docs
    import datasets

    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "ds"))
    assert read_texts(str(tmp_path / "ds")) == docs


def test_lora_mode(converted, tmp_path):
    result = finetune(str(converted), _opts(tmp_path, train="lora", steps=3))
    model = ibnorm.load(result.out)  # merged back into plain weights
    assert not any("lora" in k for k in model.state_dict())


def test_two_processes_match_one(converted, tmp_path):
    common = ["finetune", str(converted), "--data", "builtin:pydoc:train", "--eval-data", "builtin:pydoc:eval", "--steps", "6",
              "--seq-len", "32", "--train", "all", "--lr", "1e-2", "--no-source", "--eval-every", "3", "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "ibnorm_cli", *common, "--batch-size", "4", "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ibnorm_cli", *common,
                          "--batch-size", "2", "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert abs(a["final_loss"] - b["final_loss"]) < 1e-5
    sa, sb = ibnorm.load(tmp_path / "one").state_dict(), ibnorm.load(tmp_path / "two").state_dict()
    assert max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa) < 1e-4


def test_baseline_finetune_of_source_trains_original_norms(converted, tmp_path):
    src = converted.parent / "src"
    result = finetune(str(src), _opts(tmp_path, train="norms", steps=3))
    out = Path(result.out)
    assert (out / "ibnorm_finetune.json").exists() and (out / "loss_curve.png").exists()
    import transformers

    tuned = transformers.AutoModelForCausalLM.from_pretrained(out)
    orig = transformers.AutoModelForCausalLM.from_pretrained(src)
    changed = [k for k, v in tuned.state_dict().items() if not torch.equal(v, orig.state_dict()[k])]
    assert changed and all("norm" in k for k in changed)


def test_image_folder_finetune_of_timm_classifier(tmp_path):
    from PIL import Image

    for c, color in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (48, 48), tuple(min(255, v + 7 * i) for v in color)).save(tmp_path / "imgs" / c / f"{i}.png")
    conv = tmp_path / "r18"
    ibnorm.convert_checkpoint("timm:resnet18", conv, ibnorm.ConvertOptions(calib=str(tmp_path / "imgs")), pretrained=False)
    result = finetune(str(conv), FinetuneOptions(data=str(tmp_path / "imgs"), steps=4, batch_size=4, lr=1e-2, warmup=1,
                                                 eval_every=2, out=str(tmp_path / "ft"), compare_source=False))
    assert [e["step"] for e in result.evals] == [0, 2, 4] and "accuracy" in result.evals[-1]
    model = ibnorm.load(result.out)
    assert isinstance(model.bn1, ibnorm.IBBatchNorm2d)
    manifest = json.loads((Path(result.out) / "ibnorm_manifest.json").read_text())
    assert "accuracy" in manifest["finetune"]["final"]


def test_mi_every_records_information_along_training(converted, tmp_path):
    import math

    from ibnorm.mi import read_trajectory

    result = finetune(str(converted), _opts(tmp_path, train="norms", steps=4, mi_every=2))
    records = read_trajectory(str(Path(result.out) / "metrics.jsonl"))
    assert [r["step"] for r in records] == [0, 2, 4]
    layers = json.loads((Path(result.out) / "ibnorm_manifest.json").read_text())["layers"]
    assert set(records[0]["mi"]) == {l["name"] for l in layers}  # every norm
    for r in records:
        for v in r["mi"].values():
            assert math.isfinite(v["I_XT"]) and math.isfinite(v["I_TY"]) and v["I_TY"] >= -0.05
