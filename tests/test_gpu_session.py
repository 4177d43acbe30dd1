"""The prepared GPU session (benchmarks/gpu_session.py) runs every step end to end at tiny shapes on
CPU (kernels under the Triton interpreter), so the one GPU run cannot fail for a typo."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_session  # noqa: E402

pytest.importorskip("accelerate")


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_session")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_session.py"), "--tiny", "--out", str(tmp / "out"),
                           "--work", str(tmp / "work")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp / "out", json.loads((tmp / "out" / "summary.json").read_text())


def test_every_step_ran(session):
    out, summary = session
    log = (out / "session_log.txt").read_text()
    assert list(summary["steps"]) == list(gpu_session.STEPS)
    for name, step in summary["steps"].items():
        assert step["status"] == "ok", (name, step, log[-3000:])
    # What comes back from a GPU machine: at most 8 files, plain names, no folders.
    assert sorted(p.name for p in out.iterdir()) == ["kernel_tests.txt", "session_log.txt", "summary.json", "summary.md"]


def test_summary_schema_and_targets(session):
    _, summary = session
    for t in summary["targets"]:
        assert set(t) == {"name", "value", "unit", "target", "met"}
        assert isinstance(t["value"], (int, float)) and t["target"].split()[0] in ("<=", ">=")
        bound = float(t["target"].split()[1])
        assert t["met"] == (t["value"] <= bound if t["target"].startswith("<=") else t["value"] >= bound)
    names = {t["name"] for t in summary["targets"]}
    assert "kernel_tests.failed" in names
    assert {"train_step.eager.ibnorm_over_rmsnorm", "train_step.compiled.ibnorm_over_rmsnorm"} <= names
    # rms and layer, scalar and per-channel λ, forward and backward
    assert len([n for n in names if n.startswith("bandwidth.")]) == 8
    env = summary["environment"]
    assert env["commit"] and env["date"] and env["torch"] and "nvidia_smi" in env
    assert "## Targets" in summary["markdown"]


def test_results_are_real(session):
    _, summary = session
    targets = {t["name"]: t for t in summary["targets"]}
    figures = {f["name"]: f["value"] for f in summary["figures"]}
    assert targets["kernel_tests.failed"]["value"] == 0 and figures["kernel_tests.passed"] == 2
    # The kernels (interpreter) and the reference fine-tune the converted model to the same losses.
    assert targets["finetune.loss_curves.max_relative_difference"]["met"] is True
    curves = summary["steps"]["finetune"]["loss_curves"]
    assert len(curves) == 3 and all(len(c) == 3 for c in curves.values())
    assert figures["convert.perplexity.source"] > 1 and figures["convert.perplexity.converted"] > 1
    assert figures["finetune.tokens_per_s.kernels"] > 0


def test_a_step_that_dies_or_times_out_is_recorded(tmp_path):
    rec = gpu_session.Record(tmp_path / "x.json")
    rec.target("a", 1.5, "×", "<=", 1.1)
    assert gpu_session.read_step(tmp_path / "x.json", None)["status"] == "timeout"
    assert gpu_session.read_step(tmp_path / "x.json", 1)["status"] == "failed"
    assert gpu_session.read_step(tmp_path / "x.json", -9)["reason"] == "killed by signal 9"
    assert gpu_session.read_step(tmp_path / "x.json", 1)["targets"][0]["met"] is False
    assert gpu_session.read_step(tmp_path / "missing.json", None)["status"] == "timeout"
    rec.finish("ok")
    assert gpu_session.read_step(tmp_path / "x.json", 0)["status"] == "ok"


def test_junit_counts(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="10" failures="2" errors="1" skipped="3"/></testsuites>')
    assert gpu_session.junit_counts(xml) == {"passed": 4, "failed": 3, "failed_only": 2, "errors": 1, "skipped": 3}


def test_smollm2_is_found_or_its_absence_explained(tmp_path):
    from types import SimpleNamespace

    missing = SimpleNamespace(tiny=False, smollm2=str(tmp_path / "nowhere.gguf"), work=str(tmp_path))
    source, why = gpu_session.smollm2_source(missing)
    assert source is None and "SmolLM2 not found" in why
    from models import SMOLLM2

    if SMOLLM2 is not None:  # the short name resolves to the installed package's GGUF
        source, why = gpu_session.smollm2_source(SimpleNamespace(tiny=False, smollm2=None, work=str(tmp_path)))
        assert source == str(SMOLLM2) and why == ""


def test_in_memory_store_fits_gpu_models_on_cpu_copies():
    # convert --device cuda: the fit reads the source norm on CPU, as the streamed store does.
    import torch

    from ibnorm.pipeline.stores import ModelStore
    from ibnorm.surgery import find_norms
    from models import tiny_hf

    model = tiny_hf("llama")
    store = ModelStore(model, family=None)
    site = find_norms(model)[0][0]
    assert store.source_norm(site) is site  # on CPU: as found
    store.device = torch.device("cuda")  # what a model moved to the GPU reports
    copy = store.source_norm(site)
    assert copy.module is not site.module and next(copy.module.parameters()).device.type == "cpu"
    x = torch.randn(3, site.spec.shape[-1])
    torch.testing.assert_close(copy.module(x), site.module(x), rtol=0, atol=0)


def test_without_smollm2_its_steps_are_skipped_with_the_reason(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_session.py"), "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w"),
           "--steps", "convert,finetune", "--smollm2", str(tmp_path / "missing.gguf")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = json.loads((tmp_path / "out" / "summary.json").read_text())["steps"]
    assert steps["convert"]["status"] == "skipped" and "SmolLM2 not found" in steps["convert"]["reason"]
    assert steps["finetune"]["status"] == "skipped"
    bad = subprocess.run(cmd[:6] + ["--steps", "kernels"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines() == ["error: unknown step(s) kernels; choose from "
                                                                      + ", ".join(gpu_session.STEPS)]
