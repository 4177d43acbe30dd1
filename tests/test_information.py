"""Mutual-information estimators against analytic values, and ``ibnorm mi`` end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ibnorm.information import gaussian_mi, mutual_information


def _gaussian_pair(n: int, d: int, rho: float, seed: int):
    """X ~ N(0, I_d); Y = ρX + √(1−ρ²)Z, seen through an invertible mixing of each side."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = rho * x + math.sqrt(1 - rho**2) * rng.standard_normal((n, d))
    cov = np.eye(2 * d)
    cov[:d, d:] = cov[d:, :d] = rho * np.eye(d)
    return x @ rng.standard_normal((d, d)), y @ rng.standard_normal((d, d)) + 5.0, gaussian_mi(cov, d)


@pytest.mark.parametrize("estimator", ["ksg-bc", "ksg"])
@pytest.mark.parametrize("rho", [0.5, 0.8])
def test_gaussian_within_25_percent(estimator, rho):
    x, y, truth = _gaussian_pair(4000, 4, rho, seed=1)
    est = mutual_information(torch.tensor(x), torch.tensor(y), estimator=estimator)
    assert abs(est - truth) < 0.25 * truth, (est, truth)


def test_bias_correction_reduces_the_bias_at_strong_dependence():
    x, y, truth = _gaussian_pair(4000, 4, 0.9, seed=2)
    plain, corrected = mutual_information(x, y, estimator="ksg"), mutual_information(x, y, estimator="ksg-bc")
    assert abs(corrected - truth) < abs(plain - truth), (plain, corrected, truth)


def test_independent_is_about_zero():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((2000, 4)), rng.standard_normal((2000, 3)) ** 3  # non-Gaussian too
    for est in ("ksg-bc", "ksg"):
        assert abs(mutual_information(x, y, estimator=est)) < 0.05


def test_invariant_under_invertible_affine_maps():
    x, y, _ = _gaussian_pair(3000, 3, 0.7, seed=4)
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((3, 3)) * 10, rng.standard_normal((3, 3)) * 0.01
    base = mutual_information(x, y)
    moved = mutual_information(x @ a - 100.0, y @ b + 3.0)
    assert abs(moved - base) < 0.05 * base, (base, moved)


@pytest.mark.parametrize("sep, low, high", [(8.0, 0.95, 1.0), (1.0, 0.1, 0.8)])
def test_discrete_labels_between_zero_and_log_k(sep, low, high):
    rng = np.random.default_rng(6)
    k, n = 4, 2000
    labels = rng.integers(0, k, n)
    centres = rng.standard_normal((k, 3))
    centres *= sep / np.linalg.norm(centres[:, None] - centres[None], axis=-1)[np.triu_indices(k, 1)].min()
    x = centres[labels] + rng.standard_normal((n, 3))
    mi = mutual_information(torch.tensor(x), torch.tensor(labels))
    assert low * math.log(k) < mi <= high * math.log(k) + 0.03, (mi, math.log(k))


def test_discrete_labels_independent_is_about_zero():
    rng = np.random.default_rng(7)
    assert abs(mutual_information(rng.standard_normal((2000, 3)), rng.integers(0, 5, 2000))) < 0.05


def test_renyi_orders_dependence():
    xs, ys, _ = _gaussian_pair(800, 2, 0.9, seed=8)
    xw, yw, _ = _gaussian_pair(800, 2, 0.3, seed=8)
    rng = np.random.default_rng(9)
    ind = mutual_information(rng.standard_normal((800, 2)), rng.standard_normal((800, 2)), estimator="renyi")
    weak, strong = mutual_information(xw, yw, estimator="renyi"), mutual_information(xs, ys, estimator="renyi")
    assert ind < weak < strong


def test_bad_input():
    with pytest.raises(ValueError, match="same number of rows"):
        mutual_information(np.zeros((20, 2)), np.zeros((21, 2)))
    with pytest.raises(ValueError, match="unknown estimator"):
        mutual_information(np.zeros((20, 2)), np.zeros((20, 2)), estimator="nope")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from models import tiny_lm_with_tokenizer

    return tiny_lm_with_tokenizer(tmp_path_factory.mktemp("mi") / "lm")


def _cli(*args: str):
    from typer.testing import CliRunner

    from ibnorm_cli.main import app

    return CliRunner().invoke(app, list(args))


def test_mi_command_json_and_plot(tiny_lm, tmp_path):
    plot = tmp_path / "plane.png"
    conv = tmp_path / "conv"
    assert _cli("convert", str(tiny_lm), "--lam", "0", "--out", str(conv)).exit_code == 0
    r = _cli("mi", str(tiny_lm), "--compare", str(conv), "--data", "builtin:pydoc:eval", "--tokens", "400",
             "--reps", "2", "--plot", str(plot), "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["estimator"] == "ksg-bc" and len(out["layers"]) == 5  # 2 blocks × 2 norms + final norm
    for a, b in zip(out["layers"], out["compare"][0]["layers"]):
        # at λ = 0 the converted IBNorm layers compute the source's norms: same data, same numbers
        assert a["name"] == b["name"] and b["module"].startswith("IB")
        assert a["I_XT"] == pytest.approx(b["I_XT"], abs=1e-6) and a["I_TY"] == pytest.approx(b["I_TY"], abs=1e-6)
        assert 0 < a["I_XT"] <= out["I_XT_bound"] + 0.3 and a["I_TY"] > 0 and a["I_XT_err"] >= 0
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_information_snapshot_and_trajectory(tiny_lm, tmp_path):
    from ibnorm.loading import open_model
    from ibnorm.mi import information_snapshot

    loaded = open_model(str(tiny_lm))
    ids = torch.randint(0, 300, (2, 128), generator=torch.Generator().manual_seed(0))
    snap = information_snapshot(loaded.model, ids, every_layer=2)
    assert list(snap) == ["model.layers.0.input_layernorm", "model.layers.1.input_layernorm", "model.norm"]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in [{"step": 1, "loss": 3.0}, {"step": 10, "mi": snap}, {"step": 20, "mi": snap}]))
    plot = tmp_path / "traj.png"
    r = _cli("mi", "--trajectory", str(metrics), "--plot", str(plot), "--json")
    assert r.exit_code == 0, r.output
    assert [t["step"] for t in json.loads(r.stdout)["trajectory"]] == [10, 20] and plot.exists()


def test_mi_command_errors(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"step": 1, "loss": 2.0}\n')
    for args in (["mi", "--trajectory", str(bad)], ["mi", str(tmp_path / "missing"), "--data", "builtin:pydoc:eval"],
                 ["mi", str(tmp_path), "--data", "x", "--estimator", "nope"], ["mi"]):
        r = _cli(*args)
        assert r.exit_code == 2 and "error:" in r.output and "Traceback" not in r.output, r.output


def test_shared_projection_keeps_i_xt_under_an_invertible_channel_shrink():
    """A layer that shrinks two huge channels 100× is invertible: it loses no information about X.
    Each side on its own principal axes reads T along other directions than X (the shrunk channels drop
    out of T's top components) and the estimate falls by half; read along X's axes it stays put."""
    from ibnorm.mi import MIOptions, layer_information

    rng = np.random.default_rng(0)
    n, d = 2000, 16
    x = rng.standard_normal((n, d)) * np.array([100.0, 100.0, *np.linspace(10, 1, d - 2)])
    t = np.hstack([x[:, :2] * 0.01, x[:, 2:]])
    y = np.zeros(n, dtype=np.int64)
    def ixt(proj: str, tt: np.ndarray) -> float:
        return layer_information(torch.tensor(x), torch.tensor(tt), y, MIOptions(data="", reps=0, projection=proj, estimator="ksg"))["I_XT"]
    reference = ixt("shared", x)  # T = X
    assert ixt("own", x) == pytest.approx(reference)
    assert ixt("shared", t) == pytest.approx(reference, abs=0.05)
    assert ixt("own", t) < reference - 1.0
