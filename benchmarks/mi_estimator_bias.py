"""Bias of the KSG estimators on Gaussians with a known MI (docs/information.md's table).

    python benchmarks/mi_estimator_bias.py benchmarks/results/mi_estimator_bias/results.json

X ~ N(0, I₄), Y = ρX + √(1−ρ²)Z, Y seen through a random invertible linear map and a shift; n = 4000,
d = 4 per side, seeds 0–2. True MI = −½·4·log(1−ρ²). Also independent pairs (ρ = 0) at n = 2000.
Writes the estimate / true ratio per seed, its mean and std.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ibnorm.information import mutual_information  # noqa: E402


def sample(rho: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4))
    y = rho * x + np.sqrt(1 - rho ** 2) * rng.standard_normal((n, 4))
    return x, y @ rng.standard_normal((4, 4)) + rng.standard_normal(4)


def main(out: Path) -> None:
    res = {"setup": "X ~ N(0, I4), Y = rho X + sqrt(1 - rho^2) Z through a random linear map and shift, d = 4",
           "seeds": [0, 1, 2], "rows": []}
    for rho, n in ((0.5, 4000), (0.8, 4000), (0.9, 4000), (0.0, 2000)):
        true = -0.5 * 4 * np.log(1 - rho ** 2)
        row = {"rho": rho, "n": n, "true": true}
        for est in ("ksg", "ksg-bc"):
            vals = [mutual_information(*sample(rho, n, s), estimator=est) for s in (0, 1, 2)]
            row[est] = {"values": vals, "mean": float(np.mean(vals))}
            if true > 0:
                ratios = [v / true for v in vals]
                row[est].update({"ratio_mean": float(np.mean(ratios)), "ratio_std": float(np.std(ratios, ddof=1))})
            print(rho, est, row[est], flush=True)
        res["rows"].append(row)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/mi_estimator_bias/results.json"))
