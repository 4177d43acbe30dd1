"""Per-call CPU time of one inference norm: the source's norm against IBNorm's three CPU forms.

    python benchmarks/cpu_norms.py [--repeats 41] [--out benchmarks/results/cpu_norms.md]

Row shapes are SmolLM2's (hidden 576) at decode (4 sequences × 1 token) and prefill (4 × 256
tokens), and a 7B-sized prefill row (1 × 512 × 4096); convolution shapes are ResNet's.  The source
is HF's ``LlamaRMSNorm`` (what the model runs), ``nn.LayerNorm``, ``nn.BatchNorm2d`` in eval or
``nn.GroupNorm(32, C)``; IBNorm is the converted layer with a per-channel λ in [0.06, 0.46] with
5% of channels at 0, called as the model calls it (module call, inference mode) through:
``fused`` (the C function), ``torch form`` (what serves without a C compiler), and
``reference`` (``IBNORM_KERNEL=reference``).  Batch and group have no torch form: that column runs
the reference for them.  Each sample times a block of calls; the paths take
turns within every repeat; the table gives the best and the median per call, and the ratio of the
best to the source's best (allocation and page-fault effects make the medians of the large shapes
move by 2× between rows on the 2-core machine).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import ibnorm  # noqa: E402
from _common import print_and_save  # noqa: E402
from ibnorm.kernels import cpu_fused  # noqa: E402

ROW_SHAPES = {"decode 4×1×576": (4, 1, 576), "prefill 4×256×576": (4, 256, 576), "prefill 1×512×4096": (1, 512, 4096)}
CONV_SHAPES = {"1×64×56×56": (1, 64, 56, 56), "32×64×56×56": (32, 64, 56, 56), "32×512×7×7": (32, 512, 7, 7)}
SHAPES = {"rms": ROW_SHAPES, "layer": ROW_SHAPES, "batch": CONV_SHAPES, "group": CONV_SHAPES}


def _source(variant: str, shape: tuple[int, ...]) -> nn.Module:
    if variant == "rms":
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        return LlamaRMSNorm(shape[-1], eps=1e-5)
    if variant == "batch":
        return nn.BatchNorm2d(shape[1])  # eval: running statistics
    if variant == "group":
        return nn.GroupNorm(32, shape[1])
    return nn.LayerNorm(shape[-1])


def _converted(source: nn.Module, op: str, h: int) -> nn.Module:
    ib = ibnorm.from_module(source, op=op, lam=0.2).eval()
    lam = torch.rand(h) * 0.4 + 0.06
    lam[::20] = 0.0
    with torch.no_grad():
        ib.lam.data = lam
    return ib


def _paths(ib: nn.Module) -> dict:
    def fused(x):
        return ib(x)

    def torch_form(x):
        applies = cpu_fused.applies
        cpu_fused.applies = lambda *a: False  # what runs where no C compiler is found
        try:
            return ib(x)
        finally:
            cpu_fused.applies = applies

    def reference(x):
        os.environ["IBNORM_KERNEL"] = "reference"
        try:
            return ib(x)
        finally:
            os.environ.pop("IBNORM_KERNEL")

    return {"fused": fused, "torch form": torch_form, "reference": reference}


def _block_ms(fn, x, calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        fn(x)
    return (time.perf_counter() - t) * 1e3 / calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=41)
    ap.add_argument("--ops", nargs="+", default=["tanh", "log", "power"])
    ap.add_argument("--variants", nargs="+", default=list(SHAPES))
    ap.add_argument("--out", default="benchmarks/results/cpu_norms.md")
    args = ap.parse_args()
    if not cpu_fused.available():
        sys.exit("error: the fused C path is not available here (no C compiler, or IBNORM_CPU_C=0)")
    torch.manual_seed(0)
    rows = []
    for variant in args.variants:
        for shape_name, shape in SHAPES[variant].items():
            h = shape[-1] if variant in ("rms", "layer") else shape[1]
            src = _source(variant, shape).eval()
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(shape).to(dtype)
                s = src.to(dtype)
                for op in args.ops:
                    fns = {"source": s, **_paths(_converted(s, op, h).to(dtype))}
                    calls = max(5, (1 << 22) // x.numel())  # a block is ≥ ~1 ms of work
                    samples = {k: [] for k in fns}
                    with torch.inference_mode():
                        for name, fn in fns.items():  # warm-up: the build, caches, first-call allocations
                            _block_ms(fn, x, 2)
                        for _ in range(args.repeats):
                            for name, fn in fns.items():
                                samples[name].append(_block_ms(fn, x, calls))
                    best = {k: min(v) for k, v in samples.items()}
                    med = {k: statistics.median(v) for k, v in samples.items()}
                    rows.append([variant, shape_name, str(dtype).replace("torch.", ""), op,
                                 f"{_fmt(best['source'])} / {_fmt(med['source'])}"]
                                + [f"{_fmt(best[k])} / {_fmt(med[k])} ({best[k] / best['source']:.2f}×)"
                                   for k in ("fused", "torch form", "reference")])
                    print(" | ".join(rows[-1]), flush=True)
    title = (f"One inference norm call on CPU: source norm vs IBNorm's CPU forms (per-channel λ; best / median "
             f"of {args.repeats} interleaved samples, ratio of the bests; {torch.get_num_threads()} threads)")
    columns = ["variant", "shape", "dtype", "op", "source", "fused C", "torch form", "reference"]
    print_and_save(args.out, title, columns, rows)


def _fmt(ms: float) -> str:
    return f"{ms * 1e3:.0f} µs" if ms < 1 else f"{ms:.2f} ms"


if __name__ == "__main__":
    main()
