"""``ibnorm study --from``: a tiny LLaMA compared with its IBNorm conversion, end to end through the CLI;
step 0 against the source model evaluated directly; resume; shards; refusals."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from models import tiny_lm_with_tokenizer
from validation_helpers import assert_clean_refusal, run_cli

ARGS = ("--data", "builtin:pydoc:train", "--eval-data", "builtin:pydoc:eval", "--steps", "3", "--seeds", "2",
        "--lrs", "0.01", "--lrs", "0.003", "--seq-len", "32", "--batch-size", "2", "--warmup", "1", "--val-blocks", "4",
        "--test-docs", "6", "--calib-samples", "4", "--threads", "1")


def _study(src: Path, out: Path):
    from ibnorm.study.pretrained import PretrainedStudy, parse_arms

    return PretrainedStudy(str(src), "builtin:pydoc:train", out, "builtin:pydoc:eval", parse_arms(()), "norms", 3, 2,
                           (0.01, 0.003), 32, 2, 1, val_blocks=4, test_docs=6, calib_samples=4, threads=1)


def _records(out: Path) -> dict[str, dict]:
    return {str(p.relative_to(out)): json.loads(p.read_text()) for p in sorted((out / "runs").rglob("*.json"))}


def _figures(rec: dict) -> tuple:
    return rec["val"], rec["test"], rec["test_docs"], rec.get("losses")


@pytest.fixture(scope="module")
def done(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("pretrained")
    src = tiny_lm_with_tokenizer(root / "src")
    out = root / "study"
    r = run_cli("study", "--from", str(src), *ARGS, "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    return src, out, json.loads(r.stdout)


def test_the_command_reports_the_study_schema(done):
    _, out, res = done
    assert set(res) == {"runs", "summary", "comparisons"}
    # 2 arms: step 0 each, the 2-point grid on seed 0, then seed 1 at the selected rate
    assert len(res["runs"]) == 2 * (1 + 2 + 1)
    assert {r["step"] for r in res["runs"]} == {0, 3}
    assert [(r["arm"], r["step"]) for r in res["summary"]] == [("source", 0), ("tanh", 0), ("source", 3), ("tanh", 3)]
    (c,) = res["comparisons"]
    assert {"arm", "delta", "interval", "p", "p_holm", "verdict"} <= set(c) and c["arm"] == "tanh"
    # the delta is the mean over seeds of the paired test-loss differences at each arm's selected rate
    chosen = {r["arm"]: r["lr"] for r in res["summary"] if r["step"] == 3}
    test = {(r["arm"], r["seed"]): r["test"] for r in res["runs"] if r["step"] == 3 and r["lr"] == chosen[r["arm"]]}
    assert c["delta"] == pytest.approx(sum(test["tanh", s] - test["source", s] for s in (0, 1)) / 2, rel=1e-12)
    # the selected rate is the seed-0 run of lowest validation loss
    for arm, lr in chosen.items():
        grid = [r for r in res["runs"] if r["arm"] == arm and r["step"] == 3 and r["seed"] == 0]
        assert lr == min(grid, key=lambda r: r["val"])["lr"]
    md = (out / "results.md").read_text()
    assert f"| norms | tanh | {chosen['tanh']:g} |" in md and c["verdict"] in md
    assert (out / "loss_norms.png").read_bytes()[:4] == b"\x89PNG"


def test_step_0_of_the_source_arm_is_the_source_models_own_loss(done):
    """Independent reference: each test document through the source model, HF's own mean next-token loss."""
    import transformers as T

    from ibnorm.data import read_texts

    src, _, res = done
    model = T.AutoModelForCausalLM.from_pretrained(src).eval()
    tok = T.AutoTokenizer.from_pretrained(src)
    losses = []
    with torch.no_grad():
        for text in read_texts("builtin:pydoc:eval"):
            ids = tok(text, add_special_tokens=False)["input_ids"][:32]
            if len(ids) >= 2:
                losses.append(float(model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss))
            if len(losses) == 6:
                break
    step0 = next(r for r in res["runs"] if r["arm"] == "source" and r["step"] == 0)
    assert step0["test_docs"] == pytest.approx(losses, rel=1e-5)
    assert step0["test"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_a_deleted_or_interrupted_run_is_redone_identically(done, tmp_path, monkeypatch):
    import ibnorm.finetune as ft
    from ibnorm.study.pretrained import run_one, run_study

    _, out, _ = done
    again = tmp_path / "again"
    shutil.copytree(out, again)
    before = _records(out)
    deleted = next(k for k in before if k.endswith("_s1.json") and "/source/" in k)
    (again / deleted).unlink()
    run_study(_study(done[0], again))
    assert _figures(_records(again)[deleted]) == _figures(before[deleted])

    # interrupted after 2 of 3 steps: the checkpoint written on the way out is resumed
    cfg = before[deleted]["config"]
    real = ft.finetune

    def stop_at_2(path, opts, progress=None):
        def hook(e):
            if e.get("event") == "step" and e["step"] == 2:
                raise KeyboardInterrupt
        return real(path, opts, hook)

    monkeypatch.setattr(ft, "finetune", stop_at_2)
    with pytest.raises(KeyboardInterrupt):
        run_one(cfg, again)
    assert list((again / "work").rglob("step-0000002"))
    monkeypatch.setattr(ft, "finetune", real)
    assert _figures(run_one(cfg, again)) == _figures(before[deleted])


def test_a_run_launched_under_torchrun_records_the_same_figures(done, tmp_path):
    src, out, _ = done
    again = tmp_path / "launched"
    shutil.copytree(out, again)
    before = _records(out)
    deleted = next(k for k in before if k.endswith("_s1.json") and "/tanh/" in k)
    (again / deleted).unlink()
    r = run_cli("study", "--from", str(src), *ARGS, "--out", str(again), "--launcher", "torchrun", "--json")
    assert r.exit_code == 0, r.output
    assert _figures(_records(again)[deleted]) == _figures(before[deleted])


def test_shards_merge_to_the_single_process_result(done, tmp_path):
    from ibnorm.study.pretrained import run_study
    from ibnorm.study.pretrained_report import summarize

    src, out, _ = done
    merged = tmp_path / "merged"
    merged.mkdir()
    for part in ("arms", "data", "study.json"):  # the prepared arms, as a job array's first step leaves them
        (shutil.copytree if (out / part).is_dir() else shutil.copy)(out / part, merged / part)
    study = _study(src, merged)
    for _ in range(2):  # the array runs twice: the grid, then the seeds at the selected rate
        for shard in ((0, 2), (1, 2)):
            run_study(study, shard=shard)
    a, b = _records(out), _records(merged)
    assert a.keys() == b.keys()
    assert all(_figures(a[k]) == _figures(b[k]) for k in a)
    strip = lambda res: {k: res[k] for k in ("summary", "comparisons")}  # noqa: E731
    assert strip(summarize(study)) == strip(summarize(replace(study, out=out)))


@pytest.mark.parametrize("args, fragment", [
    (("--arms", "softmax"), "unknown arm"),
    (("--arms", "tanh@x"), "not a number"),
    (("--shard", "3/2"), "--shard"),
    (("--train", "everything"), "--train"),
    (("--lrs", "-1"), "lr"),
])
def test_bad_options_are_refused_before_any_work(done, tmp_path, args, fragment):
    src, _, _ = done
    out = tmp_path / "o"
    assert_clean_refusal(run_cli("study", "--from", str(src), *ARGS, "--out", str(out), *args), fragment)
    assert not out.exists()


def test_missing_data_and_a_study_of_other_options_are_refused(done, tmp_path):
    src, out, _ = done
    bad = list(ARGS)
    bad[1] = str(tmp_path / "missing.txt")
    assert_clean_refusal(run_cli("study", "--from", str(src), *bad, "--out", str(tmp_path / "o")), "not found")
    before = _records(out)
    changed = [a if a != "3" else "4" for a in ARGS]  # --steps 4
    assert_clean_refusal(run_cli("study", "--from", str(src), *changed, "--out", str(out)), "different options (steps)")
    assert _records(out) == before


def test_a_cached_arm_of_other_options_is_refused(done, tmp_path):
    from ibnorm.study.pretrained import StudyError, parse_arm, prepare_arm

    src, out, _ = done
    study = replace(_study(src, tmp_path / "c"), calib_samples=5)
    shutil.copytree(out / "arms", study.out / "arms")
    with pytest.raises(StudyError, match="other options"):
        prepare_arm(study, parse_arm("tanh"))


def test_the_english_corpus_is_split_by_document():
    from ibnorm.data import read_texts

    train, val, test = (read_texts(f"builtin:english:{s}") for s in ("train", "val", "test"))
    assert len(train) + len(val) + len(test) == len(read_texts("builtin:english")) > 1000
    assert not (set(train) & set(test)) and not (set(val) & set(test)) and not (set(train) & set(val))
    assert 1.5e6 < sum(map(len, train + val + test)) < 3e6


def test_the_arm_grammar():
    from ibnorm.errors import IBNormError
    from ibnorm.study.pretrained import Arm, parse_arm, parse_arms

    assert parse_arm("source") == Arm("source")
    assert parse_arm("log@0.25/layer") == Arm("log@0.25/layer", "log", 0.25, "layer")
    assert parse_arm("power/rms") == Arm("power/rms", "power", None, "rms")
    assert [a.name for a in parse_arms(["tanh", "log", "log", "source"])] == ["source", "tanh", "log"]
    for bad in ("tanh@", "tanh@-1", "tanh/batch", "Tanh", "tanh@0.3/rms/x", ""):
        with pytest.raises(IBNormError):
            parse_arm(bad)
