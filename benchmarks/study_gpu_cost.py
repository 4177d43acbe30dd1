"""GPU cost of the LLaMA study presets, extrapolated from the one GPU measurement committed (no GPU used here).

    python benchmarks/study_gpu_cost.py benchmarks/results/study_gpu_cost.json

Runs per preset come from the planner (benchmarks/study_estimate.py's simulated study). The time per step
is extrapolated from benchmarks/results/gpu_check/results.json (H200, LLaMA-60M shape, byte vocabulary,
64 × 256 tokens per step, bf16): the baseline's step time scales with the training FLOPs per step
(6 × matmul parameters incl. the output head, + 12 × layers × seq × dim for attention, per token), the
IBNorm-T overhead over the baseline with the normalized elements per step (tokens × dim × layers).
This is an extrapolation, not a measurement: a GPU slot should time a few steps of each preset
(`ibnorm study --preset gpu-llama60m --data CORPUS --time-limit 600`) and replace it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from study_estimate import count_runs  # noqa: E402

from ibnorm.study import get_preset  # noqa: E402

REF = {"dim": 512, "layers": 8, "ffn": 1376, "vocab": 256, "seq": 256, "batch": 64}
SMOLLM2_VOCAB = 49_152


def flops_per_step(dim: int, layers: int, ffn: int, vocab: int, seq: int, batch: int) -> float:
    matmul = layers * (4 * dim * dim + 3 * dim * ffn) + vocab * dim
    return batch * seq * (6 * matmul + 12 * layers * seq * dim)


def main(out: Path) -> None:
    ref = {r["normalizer"]: r["s_per_step"] for r in json.loads((ROOT / "benchmarks/results/gpu_check/results.json").read_text())["summary"]}
    f_ref = flops_per_step(**REF)
    elems_ref = REF["batch"] * REF["seq"] * REF["dim"] * REF["layers"]
    res = {"reference": "benchmarks/results/gpu_check/results.json (H200)", "presets": []}
    for name in ("gpu-llama60m", "gpu-llama130m"):
        p = get_preset(name, data="unused")
        task = p.tasks[0]
        m = task["model"]
        shape = {"dim": m["dim"], "layers": m["layers"], "ffn": m["ffn"], "vocab": SMOLLM2_VOCAB, "seq": task["seq_len"],
                 "batch": task["batch_size"]}
        base = ref["baseline"] * flops_per_step(**shape) / f_ref
        extra = (ref["ibnorm-t"] - ref["baseline"]) * shape["batch"] * shape["seq"] * shape["dim"] * shape["layers"] / elems_ref
        runs = count_runs(p)
        hours = sum(n * task["steps"] * (base if norm == "baseline" else base + extra) for (_, norm), n in runs.items()) / 3600
        res["presets"].append({"preset": name, "runs": sum(runs.values()), "steps": task["steps"],
                               "s_per_step_baseline": base, "s_per_step_ibnorm": base + extra, "gpu_hours": hours,
                               "slots_15min": int(hours * 4 + 0.999)})
        print(f"{name}: {sum(runs.values())} runs × {task['steps']} steps, ≈ {base:.2f} / {base + extra:.2f} s/step "
              f"(baseline / IBNorm), ≈ {hours:.0f} GPU-hours")
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/study_gpu_cost.json"))
