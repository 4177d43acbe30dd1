"""Study presets: tasks, the shared learning-rate / weight-decay grid, seeds, λ values, launcher.

Grids bracket the optimum (digits: lr 3e-4 … 3e-2, LLaMA: 3e-4 … 3e-3); selection.py says how the
tuning budget is kept equal and how a configuration is chosen.  Learnable λ trains at ``lam_lr_mult`` = 10
times the base learning rate: Adam moves a parameter by at most about lr per step, so at lr 1e-3 with
warmup and cosine decay λ could travel only ≈ 0.55·steps·lr (0.16 in 300 steps) — less than the λ range
studied (0.03 … 3); ten times that (1.6 in 300 steps, 5.5 in 1,000) lets λ reach any value of the curve, so
"learnable λ stays near its start" is no longer a step-budget effect.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

from .normalizers import NORMALIZERS


@dataclass
class Preset:
    name: str
    description: str
    tasks: list[dict]
    seeds: int = 3
    first_seed: int = 0  # seeds are first_seed … first_seed + seeds − 1; the first is also the tuning seed
    lam: float = 0.3  # the default λ of IBNorm-S/L/T (and the start of learnable λ)
    lam_curve: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0)  # IBNorm-T at its selected lr/wd
    normalizers: tuple[str, ...] = NORMALIZERS
    jobs: int = 1  # runs in parallel on this machine (each with `threads` threads)
    threads: int = 1
    launcher: str | None = None  # "torchrun" | "accelerate": each run in its own launched job
    nproc: int = 1  # processes per launched run (0: every local GPU)
    device: str | None = "cpu"  # None: CUDA when available
    probe_edges: bool = False  # one tuning-seed run beyond each grid-edge selection (edges.py): diagnostic only
    extra: dict = field(default_factory=dict)

    def seed_numbers(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.seeds))


DIGITS_LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
LLAMA_LRS = (3e-4, 1e-3, 3e-3)
LAM_LR_MULT = 10.0  # learnable λ's learning rate over the base one (see the module docstring)


def _cnn(steps: int, widths=(16, 32), blocks=1, lrs=DIGITS_LRS, wds=(0.01, 0.1), batch=64, name="resnet-digits") -> dict:
    return {"name": name, "kind": "cnn", "model": {"widths": list(widths), "blocks": blocks}, "steps": steps,
            "batch_size": batch, "eval_every": max(1, steps // 20), "lrs": list(lrs), "wds": list(wds), "lam_lr_mult": LAM_LR_MULT}


def _vit(steps: int, dim=64, depth=4, lrs=DIGITS_LRS, wds=(0.01, 0.1), batch=64) -> dict:
    return {"name": "vit-digits", "kind": "vit", "model": {"patch": 2, "dim": dim, "depth": depth, "heads": 4, "mlp": 2 * dim},
            "steps": steps, "batch_size": batch, "eval_every": max(1, steps // 20), "lrs": list(lrs), "wds": list(wds),
            "lam_lr_mult": LAM_LR_MULT}


def _lm(name: str, steps: int, dim: int, layers: int, heads: int, ffn: int, seq: int, batch: int, lrs, wds,
        eval_windows: int | None = None, data: str | None = "builtin:pydoc", curve_windows: int = 64,
        tokenizer: str | None = None, checkpoint_every: int = 0, information: int = 0) -> dict:
    """``eval_windows``: the final validation / test evaluation uses every window of each half, or a fixed
    random sample of this many when a half has more; ``curve_windows``: a fixed sample for the curve;
    ``tokenizer``: None for bytes, else a subword tokenizer (study.data.load_tokenizer); ``data`` None: the
    preset needs ``--data``; ``checkpoint_every``: steps between mid-run checkpoints (0: only at a time limit);
    ``information``: record the trained model's information plane on this many validation windows (0: no)."""
    task = {"name": name, "kind": "lm", "model": {"dim": dim, "layers": layers, "heads": heads, "ffn": ffn}, "seq_len": seq,
            "steps": steps, "batch_size": batch, "eval_every": max(1, steps // 20), "lrs": list(lrs), "wds": list(wds),
            "eval_windows": eval_windows, "curve_windows": curve_windows, "data": data, "lam_lr_mult": LAM_LR_MULT}
    task.update({k: v for k, v in (("tokenizer", tokenizer), ("checkpoint_every", checkpoint_every)) if v})
    if information:
        task["information"] = {"windows": information}
    return task


# The confirm preset's text: English prose that is not pydoc alone.  ``builtin:english`` comes with
# ibnorm.data (issue 20); a run refuses to start without it (error: unknown builtin data).
CONFIRM_TEXT = "builtin:english"

PRESETS: dict[str, Preset] = {
    "micro": Preset("micro", "test preset: two normalizers, 5 steps of a tiny CNN",
                    [_cnn(5, widths=(4, 8), lrs=(3e-3,), wds=(0.01,), batch=16)], seeds=2, lam_curve=(1.0,),
                    normalizers=("baseline", "ibnorm-t")),
    "smoke": Preset("smoke", "every normalizer, 3 seeds, two learning rates, a few dozen steps per task (minutes on 2 cores)",
                    [_cnn(60, widths=(8, 16), lrs=(1e-3, 1e-2), wds=(0.01,)), _vit(60, dim=32, depth=2, lrs=(1e-3, 1e-2), wds=(0.01,)),
                     _lm("llama-bytes", 30, 64, 2, 4, 172, 64, 8, (1e-3, 3e-3), (0.01,), eval_windows=256)],
                    lam_curve=(0.1, 1.0), jobs=2),
    "cpu": Preset("cpu", "2-core CPU study: ResNet and ViT on digits, a 0.8M-parameter LLaMA on bytes; "
                  "lr×wd grid plus the equal extra budget on the tuning seed, the choice on 3 seeds, λ curve with its own lr per point",
                  [_cnn(400), _vit(400),
                   _lm("llama-bytes", 300, 128, 4, 4, 344, 128, 16, LLAMA_LRS, (0.0, 0.1))], jobs=2),
    "confirm": Preset(
        "confirm", "the two conclusions re-tested: ResNet IBNorm-T vs BatchNorm and LLaMA IBNorm-T vs RMSNorm, "
        "at two widths each, 10 new seeds (100–109), LLaMA 1,000 steps on English text (builtin:english); "
        "IBNorm-T's λ ∈ {0.3, 1} each with its own lr, the baseline the same budget in extra lrs; the trained LLaMAs' "
        "information planes recorded "
        "(204 runs, ≈ 2–3 hours on 2 idle cores: benchmarks/study_estimate.py, benchmarks/results/study_confirm/estimate.json)",
        [_cnn(500, widths=(16, 32), name="resnet-digits"), _cnn(500, widths=(32, 64), name="resnet-digits-w2"),
         _lm("llama-bytes", 1000, 128, 4, 4, 344, 128, 16, LLAMA_LRS, (0.0, 0.1), eval_windows=1024, data=CONFIRM_TEXT, information=16),
         _lm("llama-bytes-w64", 1000, 64, 4, 4, 172, 128, 16, LLAMA_LRS, (0.0, 0.1), eval_windows=1024, data=CONFIRM_TEXT,
             information=16)],
        seeds=10, first_seed=100, lam_curve=(0.3, 1.0), normalizers=("baseline", "ibnorm-t"), jobs=2, probe_edges=True),
}

# The paper's LLaMA scales (GaLore-style configs) with a subword vocabulary (SmolLM2's 49,152-token BPE,
# offline from its GGUF), on a corpus given with --data (docs/information.md: building a local corpus);
# each run launched with torchrun over all local GPUs, checkpointed every 500 steps (--time-limit resumes).
for _name, (_dim, _layers, _heads, _ffn) in {"gpu-llama60m": (512, 8, 8, 1376), "gpu-llama130m": (768, 12, 12, 2048)}.items():
    PRESETS[_name] = Preset(
        _name, f"LLaMA-{_name[9:]} shapes, SmolLM2 tokenizer, 10k steps × 256 sequences × 256 tokens on --data; "
        "baseline vs IBNorm-T (λ 0.3, 1; own lr each) and learnable λ, 3 seeds, torchrun per run, resumable",
        [_lm(_name[4:], 10_000, _dim, _layers, _heads, _ffn, 256, 256, LLAMA_LRS, (0.0, 0.1), 2048, data=None,
             tokenizer="smollm2-135m", checkpoint_every=500)],
        lam_curve=(0.3, 1.0), normalizers=("baseline", "ibnorm-t", "ibnorm-t-learn"), launcher="torchrun", nproc=0, device=None)
PRESETS["gpu-check"] = Preset("gpu-check", "a 5-minute GPU check of the launched path: LLaMA-60M shape, baseline vs IBNorm-T/DyT, "
                              "200 steps × 64 × 256 tokens, one seed",
                              [_lm("llama60m", 200, 512, 8, 8, 1376, 256, 64, (3e-3,), (0.1,), 256)], seeds=1, lam_curve=(),
                              normalizers=("baseline", "ibnorm-t", "dyt"), launcher="torchrun", nproc=0, device=None)
PRESETS["gpu-vision"] = Preset("gpu-vision", "wider ResNet and ViT on digits, longer, torchrun per run",
                               [_cnn(3000, widths=(64, 128, 256), blocks=2), _vit(3000, dim=192, depth=6)],
                               launcher="torchrun", nproc=0, device=None)


def get_preset(name: str, seeds: int | None = None, only: tuple[str, ...] = (), data: str | None = None,
               tokenizer: str | None = None, image_data: str | None = None, tasks: tuple[str, ...] = ()) -> Preset:
    """Preset ``name`` with the given overrides; ``tasks``: only these of its tasks (ValueError naming the
    preset's tasks if one is not among them; the others are recorded in ``extra["omitted_tasks"]``)."""
    if name not in PRESETS:
        raise KeyError(name)
    p = copy.deepcopy(PRESETS[name])
    if tasks:
        names = [t["name"] for t in p.tasks]
        unknown = [t for t in tasks if t not in names]
        if unknown:
            raise ValueError(f"preset {name} has no task {unknown[0]!r}; its tasks: {', '.join(names)}")
        p.extra["omitted_tasks"] = [n for n in names if n not in tasks]
        p.tasks = [t for t in p.tasks if t["name"] in tasks]
    if seeds is not None:
        p.seeds = seeds
    if only:
        # the baseline stays: every comparison is paired against it
        p.normalizers = tuple(n for n in NORMALIZERS if n in only or n == "baseline")
    for t in p.tasks:
        if t["kind"] == "lm" and data is not None:
            t["data"] = data
        if t["kind"] == "lm" and tokenizer is not None:
            t["tokenizer"] = tokenizer
        if t["kind"] != "lm" and image_data is not None:
            t["data"], t["image_size"] = image_data, t.get("image_size", 32)
    return p
