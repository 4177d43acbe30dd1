"""``ibnorm study``: determinism, resume, the normalizers, the report and the command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from ibnorm.study import DyT, apply_normalizer, get_preset, run_study, write_report
from ibnorm.study.models import TinyResNet, TinyViT


def _runs(out: Path) -> dict[str, dict]:
    return {str(p.relative_to(out)): json.loads(p.read_text()) for p in sorted((out / "runs").rglob("*.json"))}


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "a"
    run_study(get_preset("micro"), out)
    return out


def test_micro_runs_every_planned_run(micro):
    runs = _runs(micro)
    # baseline and ibnorm-t on seeds 0, 1, plus ibnorm-t at the λ-curve value 1.0 on seeds 0, 1
    assert len(runs) == 6
    assert {(r["normalizer"], r["lam"], r["seed"]) for r in runs.values()} == {
        ("baseline", 0.0, 0), ("baseline", 0.0, 1), ("ibnorm-t", 0.3, 0), ("ibnorm-t", 0.3, 1), ("ibnorm-t", 1.0, 0), ("ibnorm-t", 1.0, 1)}
    assert all(len(r["losses"]) == 5 and not r["diverged"] for r in runs.values())


def test_runs_are_bit_identical_when_repeated(micro, tmp_path):
    again = tmp_path / "b"
    run_study(get_preset("micro"), again)
    a, b = _runs(micro), _runs(again)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k]["losses"] == b[k]["losses"] and a[k]["value"] == b[k]["value"] and a[k]["evals"] == b[k]["evals"]
    # different seeds give different runs (the seed reaches initialisation and data order)
    assert a["runs/resnet-digits/baseline/lam0_lr0.003_wd0.01_s0.json"]["losses"] != a["runs/resnet-digits/baseline/lam0_lr0.003_wd0.01_s1.json"]["losses"]


def test_interrupted_study_resumes(micro, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(micro, out)
    removed = out / "runs/resnet-digits/ibnorm-t/lam1_lr0.003_wd0.01_s1.json"
    before = json.loads(removed.read_text())
    removed.unlink()
    events = []
    run_study(get_preset("micro"), out, events.append)
    ran = [e["config"] for e in events if e["event"] == "run"]
    assert len(ran) == 1 and ran[0]["lam"] == 1.0 and ran[0]["seed"] == 1
    assert json.loads(removed.read_text())["losses"] == before["losses"]


def test_report_pairs_by_seed(micro):
    res = write_report(get_preset("micro"), micro, "test")
    rows = {r["normalizer"]: r for r in res["summary"]}
    runs = {(r["normalizer"], r["seed"]): r["value"] for r in res["runs"]}
    diff = [runs[("ibnorm-t", s)] - runs[("baseline", s)] for s in (0, 1)]
    assert rows["ibnorm-t"]["diff"] == pytest.approx(sum(diff) / 2)
    assert rows["baseline"]["n"] == 2 and rows["baseline"]["mean"] == pytest.approx((runs[("baseline", 0)] + runs[("baseline", 1)]) / 2)
    assert [p["lam"] for p in res["lambda_curve"][0]["points"]] == [0.3, 1.0]
    assert (micro / "results.md").exists() and (micro / "lambda_resnet-digits.png").read_bytes()[:4] == b"\x89PNG"


def test_dyt_matches_its_formula():
    torch.manual_seed(0)
    m = DyT(6, channel_dim=1, alpha0=0.7)
    with torch.no_grad():
        m.weight.normal_()
        m.bias.normal_()
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    ref = torch.tanh(0.7 * x) * m.weight.double().view(1, 6, 1, 1) + m.bias.double().view(1, 6, 1, 1)
    torch.testing.assert_close(m.double()(x), ref)


@pytest.mark.parametrize("make", [lambda: TinyResNet(1, 10, (4, 8)), lambda: TinyViT(8, 2, 1, 10, dim=16, depth=1, heads=2, mlp=32)])
def test_ibnorm_at_lambda_zero_trains_like_the_baseline(make):
    """At λ = 0 every IBNorm layer computes its base norm: same outputs before and after swapping."""
    torch.manual_seed(0)
    base = make().train()
    ib = apply_normalizer(make().train(), "ibnorm-t", 0.0)
    ib.load_state_dict(base.state_dict(), strict=False)
    x = torch.rand(8, 1, 8, 8)
    torch.testing.assert_close(ib(x), base(x), rtol=1e-5, atol=1e-6)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) for m in ib.modules())


def test_dyt_replaces_every_norm():
    model = apply_normalizer(TinyResNet(1, 10, (4, 8)), "dyt", 0.0)
    assert sum(isinstance(m, DyT) for m in model.modules()) == 6 and not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def _cli(*args: str):
    from typer.testing import CliRunner

    from ibnorm_cli.main import app

    return CliRunner().invoke(app, list(args))


def test_study_command_json(micro, tmp_path):
    out = tmp_path / "d"
    shutil.copytree(micro, out)  # already complete: the command only reports
    r = _cli("study", "--preset", "micro", "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert {"normalizer", "seed", "task", "metric", "value"} <= set(res["runs"][0])
    assert {"normalizer", "task", "metric", "mean", "std", "n"} <= set(res["summary"][0])


@pytest.mark.parametrize("args, message", [(["--preset", "nope"], "unknown preset"), (["--preset", "micro", "--only", "xnorm"], "unknown normalizer"),
                                           (["--preset", "micro", "--seeds", "0"], "--seeds"), (["--preset", "micro", "--shard", "3/2"], "--shard")])
def test_study_command_errors(tmp_path, args, message):
    r = _cli("study", "--out", str(tmp_path / "e"), *args)
    assert r.exit_code == 2 and "error:" in r.output and message in r.output and "Traceback" not in r.output, r.output


def test_a_changed_configuration_is_refused(micro, tmp_path):
    out = tmp_path / "f"
    shutil.copytree(micro, out)
    path = out / "runs/resnet-digits/baseline/lam0_lr0.003_wd0.01_s0.json"
    rec = json.loads(path.read_text())
    rec["config"]["task"]["steps"] = 6
    path.write_text(json.dumps(rec))
    r = _cli("study", "--preset", "micro", "--out", str(out))
    assert r.exit_code == 2 and "different configuration" in r.output
