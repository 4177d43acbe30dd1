"""``ibnorm study``: determinism, resume, the normalizers, the report and the command."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
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
    # tuning seed 0: baseline at the grid's lr and one extra lr (the equal budget), ibnorm-t at λ 0.3 and 1.0;
    # seed 1: the baseline's choice and each λ point at its own lr
    base_lrs = sorted(r["lr"] for r in runs.values() if r["normalizer"] == "baseline" and r["seed"] == 0)
    assert len(base_lrs) == 2 and 3e-3 in base_lrs
    assert len(runs) == 7
    assert {(r["normalizer"], r["lam"], r["seed"]) for r in runs.values() if r["normalizer"] == "ibnorm-t"} == {
        ("ibnorm-t", 0.3, 0), ("ibnorm-t", 0.3, 1), ("ibnorm-t", 1.0, 0), ("ibnorm-t", 1.0, 1)}
    assert all(len(r["losses"]) == 5 and not r["diverged"] for r in runs.values())
    # the test split per image, compactly: 360 losses and a 0/1 string that reproduces the accuracy
    ex = runs["runs/resnet-digits/ibnorm-t/lam1_lr0.003_wd0.01_s1.json"]["test_examples"]
    assert len(ex["loss"]) == len(ex["correct"]) == 360
    rec = runs["runs/resnet-digits/ibnorm-t/lam1_lr0.003_wd0.01_s1.json"]
    assert ex["correct"].count("1") / 360 == pytest.approx(rec["value"])
    assert sum(ex["loss"]) / 360 == pytest.approx(rec["test_loss"], abs=1e-5)


def test_runs_are_bit_identical_when_repeated(micro, tmp_path):
    again = tmp_path / "b"
    run_study(get_preset("micro"), again)
    a, b = _runs(micro), _runs(again)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k]["losses"] == b[k]["losses"] and a[k]["value"] == b[k]["value"] and a[k]["evals"] == b[k]["evals"]
    # different seeds give different runs (the seed reaches initialisation and data order)
    assert a["runs/resnet-digits/ibnorm-t/lam1_lr0.003_wd0.01_s0.json"]["losses"] != a["runs/resnet-digits/ibnorm-t/lam1_lr0.003_wd0.01_s1.json"]["losses"]


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
    assert rows["ibnorm-t"]["delta"] == pytest.approx(sum(diff) / 2)
    assert rows["ibnorm-t"]["p_holm"] is not None and rows["ibnorm-t"]["interval_kind"] == "bootstrap over seeds and documents"
    lo, hi = rows["ibnorm-t"]["interval"]
    assert -1.0 <= lo <= hi <= 1.0  # accuracy differences, as fractions
    # equal tuning budget, recorded per normalizer
    assert rows["baseline"]["budget"] == rows["ibnorm-t"]["budget"] == rows["baseline"]["tuned"] == 2
    # a one-point grid brackets nothing: the warning says so
    assert any("baseline: selected lr" in w and "edge" in w for w in res["warnings"])
    assert all(r["val_loss_fall_last10"] is not None for r in rows.values())
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


def test_study_command_probes_the_edges_when_asked(micro, tmp_path):
    out = tmp_path / "st"
    shutil.copytree(micro, out)
    r = _cli("study", "--preset", "micro", "--out", str(out), "--probe-edges", "--json")
    assert r.exit_code == 0, r.output
    probes = json.loads(r.stdout)["edge_probes"]
    # micro's one-point grid (3e-3, and an extra lr inside 1e-3 … 9e-3): every selection is on an edge of the lrs tried
    assert {p["normalizer"] for p in probes} == {"baseline", "ibnorm-t"}
    for p in probes:
        assert p["probe_lr"] == float(f"{p['lr'] * (3 if p['lr'] >= 3e-3 else 1 / 3):.2g}")
        rec = json.loads((out / "runs/resnet-digits" / p["normalizer"] / f"lam{p['lam']:g}_lr{p['probe_lr']:g}_wd0.01_s0.json").read_text())
        assert p["bracketed"] == (not rec["val_loss"] < p["val_loss"])


@pytest.mark.parametrize("args, message", [(["--preset", "nope"], "unknown preset"), (["--preset", "micro", "--only", "xnorm"], "unknown normalizer"),
                                           (["--preset", "micro", "--seeds", "0"], "--seeds"), (["--preset", "micro", "--shard", "3/2"], "--shard"),
                                           (["--preset", "smoke", "--data", "builtin:nope"], "unknown builtin data")])
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


# --- the selection protocol on simulated studies (records with a known validation loss, no training) ---


def _simulate(preset, out: Path, val_loss, extra=lambda cfg: {}) -> int:
    """Complete a study by writing a record for every planned run, ``val_loss(cfg)`` as its validation loss (and,
    plus a seed-dependent offset, as its test loss: enough for the report), ``extra(cfg)`` merged in."""
    from ibnorm.study.runner import plan, write_run

    written = 0
    while True:
        todo, _ = plan(preset, out)
        if not todo:
            return written
        for cfg in todo:
            v = val_loss(cfg)
            write_run(out, {"config": cfg, "lr": cfg["lr"], "wd": cfg["wd"], "lam": cfg["lam"], "seed": cfg["seed"],
                            "normalizer": cfg["normalizer"], "task": cfg["task"]["name"], "metric": "ppl", "diverged": False,
                            "val_loss": v, "value": v + 1e-3 * (cfg["seed"] % 3), "test_loss": v + 1e-3 * (cfg["seed"] % 3),
                            "evals": [], "s_per_step": 0.1, "activation_mib": 1.0, "peak_mem_mib": None, "mean_lambda": None,
                            **extra(cfg)})
            written += 1


def _cpu_llama(**kw):
    p = get_preset("cpu", **kw)
    p.tasks = [t for t in p.tasks if t["kind"] == "lm"]
    return p


def test_selection_picks_the_lowest_validation_loss_and_gives_every_normalizer_the_same_budget(tmp_path):
    import math

    from ibnorm.study.runner import tuning

    p = _cpu_llama()
    # a bowl in log lr with its minimum inside the grid, different per normalizer and λ
    best = {("baseline", 0.0): 8e-4, ("ibnorm-t", 0.3): 2e-3, ("ibnorm-t", 1.0): 5e-4}
    def loss(c):
        opt = best.get((c["normalizer"], c["lam"]), 1e-3)
        return 1.0 + (math.log(c["lr"]) - math.log(opt)) ** 2 + (0.01 if c["wd"] == 0.1 else 0.0) + 0.1 * c["lam"]
    _simulate(p, tmp_path, loss)
    task = p.tasks[0]
    budgets = set()
    for norm in p.normalizers:
        t = tuning(p, tmp_path, task, norm)
        runs = [r for r in t.grid_runs + t.extra_runs]
        assert t.complete and len(runs) == t.budget
        budgets.add(t.budget)
        assert t.chosen.run["val_loss"] == min(r["val_loss"] for r in runs)  # the lowest, whatever its lr
        assert t.chosen.run["wd"] == 0.0 and not t.chosen.on_edge
    # the grid's 3 lr × 2 wd plus IBNorm-T's four further λ × 3 lr, for every normalizer alike
    assert budgets == {6 + 4 * 3}
    t = tuning(p, tmp_path, task, "ibnorm-t")
    assert {lam: s.run["lr"] for lam, s in t.per_lambda.items()}[1.0] != t.per_lambda[0.3].run["lr"]  # own lr per λ
    base = tuning(p, tmp_path, task, "baseline")
    assert 3e-4 < base.chosen.run["lr"] < 3e-3 and base.chosen.run["lr"] not in task["lrs"]  # a dense extra lr won


def test_selection_ties_are_broken_by_the_documented_rule_not_toward_the_smallest_lr():
    import zlib

    from ibnorm.study.selection import select

    def rec(lr, tail):
        cfg = {"lr": lr, "wd": 0.1}
        return {"config": cfg, "lr": lr, "wd": 0.1, "lam": 0.0, "diverged": False, "val_loss": 1.25,
                "evals": [{"loss": tail}, {"loss": tail}, {"loss": 1.25}]}
    runs = [rec(1e-3, 1.40), rec(3e-3, 1.30), rec(1e-2, 1.35)]
    s = select(runs)
    assert s.run["lr"] == 3e-3  # the lower end-of-curve loss, not the smallest lr
    assert {t["lr"] for t in s.tied_with} == {1e-3, 1e-2}
    # equal tail too: the configuration's CRC-32 decides, whatever the order given
    flat = [rec(lr, 1.3) for lr in (1e-3, 3e-3, 1e-2)]
    want = min(flat, key=lambda r: zlib.crc32(json.dumps(r["config"], sort_keys=True).encode()))
    assert select(flat).run is want and select(flat[::-1]).run is want
    # a diverged run never wins
    assert select([{**rec(1e-3, 1.0), "diverged": True, "val_loss": None}, rec(3e-3, 2.0)]).run["lr"] == 3e-3


def test_a_selected_lr_on_the_grid_edge_is_flagged(tmp_path):
    p = _cpu_llama()
    _simulate(p, tmp_path, lambda c: 1.0 + c["lr"])  # always the smallest lr: the optimum may lie below the grid
    from ibnorm.study.runner import tuning

    t = tuning(p, tmp_path, p.tasks[0], "baseline")
    assert t.chosen.run["lr"] == 3e-4 and t.chosen.on_edge


def test_an_edge_probe_runs_one_grid_step_beyond_and_never_changes_the_selection(tmp_path):
    import math

    from ibnorm.study.edges import beyond
    from ibnorm.study.report import results_markdown, summarize
    from ibnorm.study.runner import tuning

    assert beyond([3e-4, 1e-3, 3e-3], 3e-3) == 9.5e-3 and beyond([3e-4, 1e-3, 3e-3], 3e-4) == 9.5e-5  # step √10
    assert beyond([3e-3], 3e-3) == 9e-3 and beyond([3e-3], 5.2e-3) == 1.6e-2  # a one-point grid: step 3
    p = _cpu_llama()
    p.normalizers, p.lam_curve = ("baseline", "ibnorm-t"), (0.3, 1.0)
    optimum = {("baseline", 0.0): 2e-2, ("ibnorm-t", 0.3): 4e-3, ("ibnorm-t", 1.0): 1e-3}  # beyond, inside, interior
    def loss(c):
        return 1.0 + (math.log(c["lr"]) - math.log(optimum[(c["normalizer"], c["lam"])])) ** 2 + 0.01 * c["wd"]
    unprobed = tmp_path / "plain"
    _simulate(p, unprobed, loss)
    p.probe_edges = True
    _simulate(p, tmp_path / "probed", loss)
    task, probed = p.tasks[0], tmp_path / "probed"
    probes = {f.relative_to(probed).as_posix() for f in probed.rglob("*.json")} - {f.relative_to(unprobed).as_posix() for f in unprobed.rglob("*.json")}
    # the baseline's choice and IBNorm-T's λ = 0.3 point (both 3e-3) are on the edge; IBNorm-T's choice (λ = 1, 1e-3) is not
    # the baseline's probe wins, so it also runs on the other seeds (the secondary analysis); IBNorm-T's loses
    assert probes == {f"runs/llama-bytes/baseline/lam0_lr0.0095_wd0_s{s}.json" for s in range(3)} | {"runs/llama-bytes/ibnorm-t/lam0.3_lr0.0095_wd0_s0.json"}
    for norm in p.normalizers:  # the probe, though lower for the baseline, is not a candidate
        a, b = tuning(p, unprobed, task, norm), tuning(p, probed, task, norm)
        assert a.chosen.run["config"] == b.chosen.run["config"]
        assert {lam: s.run["config"] for lam, s in a.per_lambda.items()} == {lam: s.run["config"] for lam, s in b.per_lambda.items()}
    assert tuning(p, probed, task, "baseline").chosen.run["lr"] == 3e-3
    res = summarize(p, probed)
    rows = {(r["normalizer"], r["lam"]): r for r in res["edge_probes"]}
    assert rows[("baseline", 0.0)]["bracketed"] is False and rows[("ibnorm-t", 0.3)]["bracketed"] is True
    assert rows[("baseline", 0.0)]["probe_val_loss"] == loss({"normalizer": "baseline", "lam": 0.0, "lr": 9.5e-3, "wd": 0.0})
    md = results_markdown(p, res, "test")
    assert "| 0.003 (edge, optimum beyond) |" in md and "| 0.003 (edge, bracketed) |" in md
    assert not any("may lie outside" in w for w in res["warnings"])  # each edge answered by its probe
    ext = {r["arm"]: r for r in res["extended"]}  # every arm at its extended choice: only the baseline moved
    assert (ext["baseline"]["lr"], ext["baseline"]["extended"]) == (9.5e-3, True)
    assert [(ext[a]["lr"], ext[a]["extended"]) for a in ("ibnorm-t λ=0.3", "ibnorm-t λ=1")] == [(3e-3, False), (1e-3, False)]
    test = lambda d, norm, lam, lr: [json.loads(f.read_text())["test_loss"] for f in sorted(d.glob(f"runs/llama-bytes/{norm}/lam{lam}_lr{lr}_wd0_s*.json"))]
    want = np.mean(np.subtract(test(probed, "ibnorm-t", "1", "0.001"), test(probed, "baseline", "0", "0.0095")))
    assert ext["ibnorm-t λ=1"]["delta"] == pytest.approx(want) and "Secondary: llama-bytes at the extended choice" in md
    assert sum("lies beyond the grid" in w for w in res["warnings"]) == 1


def test_trained_information_planes_are_compared_paired_by_seed(tmp_path):
    import math

    from scipy.stats import ttest_rel

    from ibnorm.study.report import summarize

    p = _cpu_llama()
    p.normalizers, p.lam_curve = ("baseline", "ibnorm-t"), (0.3, 1.0)
    rng = np.random.default_rng(0)
    noise = {s: rng.normal(0, 0.05, 4) for s in range(3)}  # per seed: shared by both arms (the pairing)

    def plane(cfg):  # λ = 1 raises I(T;Y) by 0.2 in every layer; I(X;T) differs by noise only
        s, lam = cfg["seed"], cfg["lam"]
        own = np.random.default_rng(hash((s, lam)) % 2**32).normal(0, 0.01, 2)
        return {"information": {f"layer{i}": {"I_XT": 2.0 + noise[s][i] + own[0], "I_TY": 1.0 + noise[s][i] + own[1] + (0.2 if lam == 1.0 else 0.0)}
                                for i in range(2)}}
    _simulate(p, tmp_path, lambda c: 1.0 + (math.log(c["lr"]) - math.log(1e-3)) ** 2 + c["lam"] * 0.01, plane)
    rows = {(r["arm"], r["quantity"]): r for r in summarize(p, tmp_path)["information_plane"]}
    assert set(rows) == {(f"ibnorm-t λ={lam}", q) for lam in ("0.3", "1") for q in ("I(X;T)", "I(T;Y)")}
    from ibnorm.study.runner import load_run, seed_configs, tuning

    def seeds(run):  # layer-mean I(T;Y) of a selected configuration on every seed, read from its run files
        return [np.mean([v["I_TY"] for v in load_run(tmp_path, c)["information"].values()]) for c in seed_configs(p, run)]
    base = seeds(tuning(p, tmp_path, p.tasks[0], "baseline").chosen.run)
    curve = tuning(p, tmp_path, p.tasks[0], "ibnorm-t").per_lambda
    r, r03 = rows[("ibnorm-t λ=1", "I(T;Y)")], rows[("ibnorm-t λ=0.3", "I(T;Y)")]
    arm = seeds(curve[1.0].run)
    assert r["delta"] == pytest.approx(np.mean(np.subtract(arm, base))) and r["p"] == pytest.approx(ttest_rel(arm, base).pvalue)
    assert r03["p"] == pytest.approx(ttest_rel(seeds(curve[0.3].run), base).pvalue)
    assert r["verdict"] == "higher" and rows[("ibnorm-t λ=1", "I(X;T)")]["verdict"] == "no detectable difference"
    lo, hi = sorted([r["p"], r03["p"]])  # Holm over the two λ points of a quantity
    assert sorted([r["p_holm"], r03["p_holm"]]) == pytest.approx([min(1, 2 * lo), min(1, max(hi, 2 * lo))])


def test_learnable_lambda_trains_at_its_own_learning_rate():
    from ibnorm.study.train import _param_groups

    model = apply_normalizer(TinyResNet(1, 10, (4, 8)), "ibnorm-t-learn", 0.3)
    groups = _param_groups(model, 0.1, 10.0)
    lam_group = [g for g in groups if g["lr_mult"] == 10.0]
    assert len(lam_group) == 1 and lam_group[0]["weight_decay"] == 0.0
    n_lam = sum(1 for m in model.modules() if getattr(m, "lam_is_learnable", False))
    assert len(lam_group[0]["params"]) == n_lam > 0
    assert sum(len(g["params"]) for g in groups) == len([q for q in model.parameters() if q.requires_grad])


def test_validation_and_test_alternate_documents_and_cover_their_halves():
    from ibnorm.data import read_texts
    from ibnorm.study.data import eval_windows, text_bytes

    held = read_texts("builtin:pydoc:eval")
    s = text_bytes("builtin:pydoc")
    val, test = bytes(s.val.to(torch.uint8).tolist()).decode(), bytes(s.test.to(torch.uint8).tolist()).decode()
    assert held[0] in val and held[1] in test and held[-2] in (val if len(held) % 2 == 0 else test)
    assert held[1] not in val and held[0] not in test  # no document in both
    w = eval_windows(s.test, 128)
    assert len(w) == (len(s.test) - 1) // 128 and torch.equal(w[-1], s.test[(len(w) - 1) * 128:len(w) * 128 + 1])
    sample = eval_windows(s.test, 128, 50)
    assert len(sample) == 50 and torch.equal(sample, eval_windows(s.test, 128, 50))  # fixed, the same for every run
    assert len({tuple(r.tolist()) for r in sample}) == 50


def test_convergence_is_the_relative_fall_over_the_last_tenth():
    from ibnorm.study.report import convergence

    evals = [{"step": s, "loss": 2.0 - s / 1000} for s in range(50, 1001, 50)]
    assert convergence({"evals": evals}) == pytest.approx((1.1 - 1.0) / 1.0)
    assert convergence({"evals": evals, "diverged": True}) is None


# --- mid-run checkpoints: a run stopped at a deadline and resumed equals the uninterrupted run ---


def _stop_after(monkeypatch, calls: int) -> None:
    import ibnorm.study.train as train

    count = {"n": 0}

    def past(deadline, world, dev):
        count["n"] += 1
        return deadline is not None and count["n"] > calls

    monkeypatch.setattr(train, "_past", past)


@pytest.mark.parametrize("kind", ["cnn", "lm"])
def test_a_run_resumed_from_its_checkpoint_equals_the_uninterrupted_run(kind, tmp_path, monkeypatch):
    import copy
    import time

    from ibnorm.study.presets import _lm
    from ibnorm.study.runner import make_config
    from ibnorm.study.train import run_one

    p = get_preset("micro")
    task = copy.deepcopy(p.tasks[0]) if kind == "cnn" else _lm("lm", 6, 16, 1, 2, 32, 16, 4, (3e-3,), (0.1,), eval_windows=8)
    task.update(steps=6, eval_every=2, checkpoint_every=2)
    cfg = make_config(p, task, "ibnorm-t-learn", 3e-3, 0.1, 1)  # learnable λ, BatchNorm buffers / tied embeddings
    full = run_one(cfg)
    ck = tmp_path / "ck"
    _stop_after(monkeypatch, 3)  # the deadline "passes" before step 3
    assert run_one(cfg, checkpoint=ck, deadline=time.time() + 1e6) is None
    assert json.loads((ck / "progress.json").read_text())["step"] == 3
    monkeypatch.undo()
    resumed = run_one(cfg, checkpoint=ck)
    assert resumed["losses"] == full["losses"] and resumed["evals"] == full["evals"]
    assert resumed["value"] == full["value"] and resumed["test_examples"] == full["test_examples"]
    assert resumed["mean_lambda"] == full["mean_lambda"] and not ck.exists()


def test_a_time_limited_study_checkpoints_and_the_next_invocation_completes_it(micro, tmp_path, monkeypatch):
    out = tmp_path / "g"
    shutil.copytree(micro, out)
    victim = out / "runs/resnet-digits/ibnorm-t/lam1_lr0.003_wd0.01_s1.json"
    victim.unlink()
    _stop_after(monkeypatch, 2)
    events = []
    assert run_study(get_preset("micro"), out, events.append, time_limit=1e6) is False
    assert [e["event"] for e in events if e["event"] != "plan"] == ["paused"] and not victim.exists()
    assert (out / "checkpoints/resnet-digits/ibnorm-t/lam1_lr0.003_wd0.01_s1/progress.json").exists()
    monkeypatch.undo()
    assert run_study(get_preset("micro"), out) is True
    assert json.loads(victim.read_text())["losses"] == _runs(micro)["runs/resnet-digits/ibnorm-t/lam1_lr0.003_wd0.01_s1.json"]["losses"]


def test_a_subword_tokenizer_sets_the_vocabulary_and_the_splits(tmp_path):
    import copy

    from models import tiny_lm_with_tokenizer

    from ibnorm.study.data import load_tokenizer, split_documents, text_splits
    from ibnorm.study.presets import _lm
    from ibnorm.study.runner import make_config
    from ibnorm.study.train import run_one

    tok_dir = str(tiny_lm_with_tokenizer(tmp_path / "tok"))
    tok = load_tokenizer(tok_dir)
    s = text_splits("builtin:pydoc", tok_dir)
    _, val_docs, _ = split_documents("builtin:pydoc")
    first = tok(val_docs[0], add_special_tokens=False)["input_ids"]
    assert s.val[: len(first)].tolist() == first and s.val[len(first)] == tok.eos_token_id  # documents end with EOS
    task = _lm("lm", 3, 16, 1, 2, 32, 16, 4, (3e-3,), (0.1,), eval_windows=8, tokenizer=tok_dir)
    rec = run_one(make_config(get_preset("micro"), copy.deepcopy(task), "baseline", 3e-3, 0.1, 0))
    assert len(rec["losses"]) == 3 and rec["test_loss"] < 2 * math.log(len(tok))
    assert rec["params"] == pytest.approx(len(tok) * 16 + sum(p for p in (16 * 16 * 4, 3 * 16 * 32, 16 * 3)), rel=0.01)


def test_gpu_presets_need_data_and_a_loadable_tokenizer(tmp_path):
    r = _cli("study", "--preset", "gpu-llama60m", "--out", str(tmp_path / "h"))
    assert r.exit_code == 2 and "needs --data" in r.output and "Traceback" not in r.output, r.output
    r = _cli("study", "--preset", "smoke", "--tokenizer", str(tmp_path / "nope"), "--out", str(tmp_path / "h"))
    assert r.exit_code == 2 and "tokenizer not found" in r.output, r.output


def test_subword_ids_of_a_corpus_on_disk_are_cached(tmp_path, monkeypatch):
    from models import tiny_lm_with_tokenizer

    import ibnorm.study.data as sd

    monkeypatch.setenv("IBNORM_CACHE", str(tmp_path / "cache"))
    tok_dir = str(tiny_lm_with_tokenizer(tmp_path / "tok"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(45):
        (corpus / f"d{i:02d}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * (i + 1))
    first = sd._tokenize(str(corpus), tok_dir)
    got = sd.text_splits(str(corpus), tok_dir)
    assert [len(list((tmp_path / "cache/study-tokens").glob("*.pt")))] == [1]
    sd.text_splits.cache_clear()
    monkeypatch.setattr(sd, "_tokenize", lambda *a: pytest.fail("tokenized again instead of reading the cache"))
    again = sd.text_splits(str(corpus), tok_dir)
    for a, b, c in zip((first.train, first.val, first.test), (got.train, got.val, got.test), (again.train, again.val, again.test)):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert len(first.val) > 0 and len(first.test) > 0  # the 19th and 20th of every 20 documents
    sd.text_splits.cache_clear()


def test_a_trained_llama_records_its_information_plane(tmp_path):
    import copy

    from ibnorm.study.presets import _lm
    from ibnorm.study.report import _describe
    from ibnorm.study.runner import make_config
    from ibnorm.study.train import run_one

    task = _lm("lm", 3, 16, 2, 2, 32, 32, 4, (3e-3,), (0.1,), eval_windows=8, information=8)
    rec = run_one(make_config(get_preset("micro"), copy.deepcopy(task), "ibnorm-t", 3e-3, 0.1, 0))
    plane = rec["information"]
    assert len(plane) == 2 * 2 + 1  # two norms per block and the final norm
    bound = 4 / 2 * math.log(1 + 1 / 0.5 ** 2)
    assert all(0 <= v["I_XT"] <= bound + 0.3 and 0 <= v["I_TY"] <= math.log(32) + 0.3 for v in plane.values())
    d = _describe([rec])["information"]
    assert d["seeds"] == 1 and d["I_TY_layer_mean"] == pytest.approx(sum(v["I_TY"] for v in plane.values()) / 5)


def test_vision_tasks_train_on_an_image_folder(tmp_path):
    import copy

    from PIL import Image

    from ibnorm.study.runner import make_config
    from ibnorm.study.train import run_one

    rng = torch.Generator().manual_seed(0)
    for c, colour in enumerate(((220, 30, 30), (30, 220, 30), (30, 30, 220))):
        (tmp_path / "img" / f"class{c}").mkdir(parents=True)
        for i in range(20):
            noise = torch.randint(0, 30, (12, 12, 3), generator=rng).numpy()
            Image.fromarray((noise + torch.tensor(colour).numpy()).clip(0, 255).astype("uint8")).save(tmp_path / "img" / f"class{c}" / f"{i}.png")
    p = get_preset("micro", image_data=str(tmp_path / "img"))
    task = copy.deepcopy(p.tasks[0])
    task["image_size"] = 8
    rec = run_one(make_config(p, task, "ibnorm-t", 3e-3, 0.01, 0))
    assert len(rec["test_examples"]["correct"]) == 12  # 20% of 60 images
    assert rec["params"] == sum(q.numel() for q in TinyResNet(3, 3, (4, 8)).parameters())  # RGB in, three classes out
    r = _cli("study", "--preset", "micro", "--image-data", str(tmp_path / "img" / "class0"), "--out", str(tmp_path / "o"))
    assert r.exit_code == 2 and "subdirectory per class" in r.output, r.output


def test_preset_task_selection_keeps_only_those_tasks_and_the_report_names_the_rest():
    from ibnorm.study import get_preset
    from ibnorm.study.report import results_markdown

    p = get_preset("confirm", tasks=("llama-bytes-w64",))
    assert [t["name"] for t in p.tasks] == ["llama-bytes-w64"]
    assert p.extra["omitted_tasks"] == ["resnet-digits", "resnet-digits-w2", "llama-bytes"]
    with pytest.raises(ValueError, match="no task 'nope'.*resnet-digits"):
        get_preset("confirm", tasks=("nope",))
    md = results_markdown(p, {"protocol": {k: "x" for k in ("selection", "budget", "compared", "statistics", "convergence")}
                              | {"seeds": [100, 109], "tuning_seed": 100}, "summary": [], "lambda_curve": [], "warnings": []}, "cmd")
    assert "Not in it (run with `--task`): resnet-digits, resnet-digits-w2, llama-bytes." in md
