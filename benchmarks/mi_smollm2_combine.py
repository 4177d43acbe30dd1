"""Combine `ibnorm mi --json` outputs (source vs converted, fine-tuned) into one information plane and table.

    python benchmarks/mi_smollm2_combine.py benchmarks/results/mi_smollm2

Reads source_vs_lam0.3.json (the source and its --compare) and, if present, finetuned.json (the same
data and rows: the token blocks are a deterministic function of --data, --tokens and --seq-len).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ibnorm.charts import render
from ibnorm.mi import plane_chart


def main(folder: str) -> None:
    d = Path(folder)
    first = json.loads((d / "source_vs_lam0.3.json").read_text())
    results = [{"model": first["model"], "layers": first["layers"]}, *first["compare"]]
    if (d / "finetuned.json").exists() and (d / "finetuned.json").stat().st_size:
        ft = json.loads((d / "finetuned.json").read_text())
        results.append({"model": ft["model"], "layers": ft["layers"]})
    (d / "information_plane.png").write_bytes(render(plane_chart(results)))
    names = ["source", "converted λ=0.3", "fine-tuned"][: len(results)]
    lines = ["| layer | " + " | ".join(f"I(X;T) {n} | I(T;Y) {n}" for n in names) + " |",
             "|---|" + "---|---|" * len(results)]
    for i, layer in enumerate(results[0]["layers"]):
        cells = [f"{r['layers'][i]['I_XT']:.3f} ± {r['layers'][i].get('I_XT_err', 0):.3f} | "
                 f"{r['layers'][i]['I_TY']:.3f} ± {r['layers'][i].get('I_TY_err', 0):.3f}" for r in results]
        lines.append(f"| {layer['name']} | " + " | ".join(cells) + " |")
    means = []
    for n, r in zip(names, results):
        ixt, ity = np.array([v["I_XT"] for v in r["layers"]]), np.array([v["I_TY"] for v in r["layers"]])
        means.append(f"- {n}: mean over layers I(X;T) = {ixt.mean():.3f}, I(T;Y) = {ity.mean():.3f}")
    for n, r in zip(names[1:], results[1:]):
        dx = np.array([b["I_XT"] - a["I_XT"] for a, b in zip(results[0]["layers"], r["layers"])])
        dy = np.array([b["I_TY"] - a["I_TY"] for a, b in zip(results[0]["layers"], r["layers"])])
        means.append(f"- {n} − source, per layer: ΔI(X;T) mean {dx.mean():+.3f} (lower in {int((dx < 0).sum())}/{len(dx)} layers), "
                     f"ΔI(T;Y) mean {dy.mean():+.3f} (higher in {int((dy > 0).sum())}/{len(dy)} layers)")
    (d / "table.md").write_text("\n".join(means) + "\n\n" + "\n".join(lines) + "\n")
    print("\n".join(means))


if __name__ == "__main__":
    main(sys.argv[1])
