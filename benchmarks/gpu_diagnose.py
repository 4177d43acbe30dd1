"""Where the fused row kernels' time goes on a GPU, and which launch shape is fastest.

    PYTHONPATH=. python benchmarks/gpu_diagnose.py --out gpu_diagnose.md [--budget-s 150]

1. Overhead: each path timed three ways — ``do_bench`` (CUDA events, L2 flushed: what a caller
   sees, CPU launch cost included when it exceeds the GPU time), ``do_bench_cudagraph`` (the GPU
   time alone: the work replayed as one CUDA graph, so no launch cost) and the CPU time per call
   (a burst of calls without synchronisation).  Paths: the forward op, the backward op called
   directly, the backward through ``torch.autograd.grad`` (custom-op + autograd machinery).
2. Sweep: GPU time (graph replay) of the backward per launch shape (one block: warps × PREFETCH ×
   programs per SM; split: both passes' shapes), and of the forward per warps, through the real
   launch code (``rownorm_op``) with its configuration functions overridden.
Numbers are diagnostics for choosing ``rownorm_op.backward_config`` / ``forward_warps``; the
benchmark of record is ``bench_kernels_gpu.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

from ibnorm.kernels import rownorm_op as R

sys.path.insert(0, os.path.dirname(__file__))
from _common import command  # noqa: E402

DTYPE = torch.bfloat16


def gpu_us(fn) -> float:
    from triton.testing import do_bench_cudagraph

    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=30, return_mode="median") * 1e3


def eager_us(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=30, return_mode="median") * 1e3


def cpu_us(fn, n: int = 30) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    dt = time.perf_counter() - t0
    torch.cuda.synchronize()
    return dt / n * 1e6


class Case:
    def __init__(self, m: int, h: int, centered: bool):
        g = torch.Generator(device="cuda").manual_seed(0)
        self.h, self.centered = h, centered
        self.x = torch.randn(m, h, device="cuda", dtype=DTYPE, generator=g)
        self.w = 1 + 0.1 * torch.randn(h, device="cuda", dtype=DTYPE, generator=g)
        self.b = torch.randn(h, device="cuda", dtype=DTYPE, generator=g) if centered else None
        self.lam = torch.tensor(0.5, device="cuda")
        self.dy = torch.randn(m, h, device="cuda", dtype=DTYPE, generator=g)
        _, self.stats = R._forward(self.x, self.w, self.b, self.lam, "tanh", 1e-5, centered)
        self.needs = [True, True, centered, False]

    def fwd(self):
        return R._forward(self.x, self.w, self.b, self.lam, "tanh", 1e-5, self.centered)

    def bwd(self):
        return R._backward(self.dy, self.x, self.w, self.lam, self.stats, "tanh", self.centered, self.needs)

    def label(self) -> str:
        return f"{'layer' if self.centered else 'rms'} {self.x.shape[0]}×{self.h}"


def overhead_rows(case: Case) -> list[list[str]]:
    x = case.x.detach().clone().requires_grad_()
    w = case.w.detach().clone().requires_grad_()
    b = case.b.detach().clone().requires_grad_() if case.b is not None else None
    leaves = [t for t in (x, w, b) if t is not None]
    y = R.row_norm_op(x, w, b, case.lam, "tanh", 1e-5, case.centered)
    grad = lambda: torch.autograd.grad(y, leaves, case.dy, retain_graph=True)
    if case.centered:
        yt = F.layer_norm(x, (case.h,), w, b, 1e-5)
        tfwd = lambda: F.layer_norm(case.x, (case.h,), case.w, case.b, 1e-5)
    else:
        yt = F.rms_norm(x, (case.h,), w, 1e-5)
        tfwd = lambda: F.rms_norm(case.x, (case.h,), case.w, 1e-5)
    tgrad = lambda: torch.autograd.grad(yt, leaves, case.dy, retain_graph=True)
    rows = []
    for name, fn, graphable in [("fwd op", case.fwd, True), ("bwd op direct", case.bwd, True),
                                ("bwd autograd.grad", grad, False), ("torch fwd", tfwd, True),
                                ("torch bwd autograd.grad", tgrad, False)]:
        g = f"{gpu_us(fn):.0f}" if graphable else "-"
        rows.append([case.label(), name, f"{eager_us(fn):.0f}", g, f"{cpu_us(fn):.0f}"])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def sweep_backward(case: Case, deadline: float) -> list[list[str]]:
    """GPU time of each backward launch shape.  One block (rows up to 8192 columns): warps ×
    PREFETCH × 1 or 2 programs per SM.  SPLIT (any width): sums-pass warps and chunk × tiles-pass
    tile and warps × 4 or 8 tile programs per SM."""
    shapes = []
    if case.h <= 8192:
        warps = (4, 8, 16) if case.h <= 4096 else (8, 16)
        shapes += [("one block", str(w), "yes" if p else "no",
                    [R.BackwardConfig(w, False, 3, per_sm, p) for per_sm in (1, 2)]) for w in warps for p in (False, True)]
    for sums_warps, chunk in ((2, 512), (4, 1024)):
        for tile, tile_warps in ((1024, 4), (2048, 8)):
            shapes.append(("split", f"{sums_warps}+{tile_warps} ({chunk}/{tile})", "-",
                           [R.BackwardConfig(sums_warps, True, chunk=chunk, tile=tile, tile_warps=tile_warps,
                                             tiles_per_sm=per_sm) for per_sm in (4, 8)]))
    original = R.backward_config
    rows = []
    try:
        for kernel, warps, prefetch, cfgs in shapes:
            times = []
            for cfg in cfgs:
                if time.time() > deadline:
                    return rows
                R.backward_config = lambda *args, cfg=cfg: cfg
                times.append(f"{gpu_us(case.bwd):.0f}")
            rows.append([case.label(), kernel, warps, prefetch] + times)
            print(" | ".join(rows[-1]), flush=True)
    finally:
        R.backward_config = original
    return rows


def sweep_forward(case: Case, deadline: float) -> list[list[str]]:
    original = R.forward_warps
    times = []
    try:
        for warps in (4, 8, 16):
            if time.time() > deadline:
                break
            R.forward_warps = lambda block, centered, warps=warps: warps
            times.append(f"{warps}: {gpu_us(case.fwd):.0f}")
    finally:
        R.forward_warps = original
    row = [case.label(), "fwd (warps: µs)", ", ".join(times)]
    print(" | ".join(row), flush=True)
    return [row]


def render(path: str | None, overhead, bwd, fwd) -> None:
    import triton

    lines = [f"# Row-kernel diagnosis on {torch.cuda.get_device_name()}", "",
             f"command: `PYTHONPATH=. {command()}`", "",
             f"torch {torch.__version__}, triton {triton.__version__}, bf16, tanh, scalar λ = 0.5", "",
             "## Time per call (µs): eager = do_bench with L2 flush; GPU = CUDA-graph replay; CPU = host time per call",
             "", "| case | path | eager | GPU | CPU |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in overhead]
    lines += ["", "## Backward GPU time (µs, graph replay) by launch shape", "",
              "Columns A/B: one block, 1 or 2 programs per SM; split, 4 or 8 tile programs per SM.", "",
              "| case | kernel | warps | prefetch | A | B |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in bwd]
    lines += ["", "## Forward GPU time by warps", "", "| case | kernel | warps: µs |", "|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in fwd]
    text = "\n".join(lines) + "\n"
    if path:
        with open(path, "w") as f:
            f.write(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget-s", type=float, default=150.0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: needs a CUDA GPU")
    deadline = time.time() + args.budget_s
    overhead, bwd, fwd = [], [], []
    for m, h, centered in [(4096, 4096, False), (4096, 8192, False), (4096, 8192, True), (4096, 16384, False)]:
        overhead += overhead_rows(Case(m, h, centered))
        render(args.out, overhead, bwd, fwd)
    for m, h, centered in [(4096, 4096, False), (4096, 8192, False), (4096, 4096, True), (4096, 8192, True),
                           (4096, 16384, True)]:
        case = Case(m, h, centered)
        if h == 16384:
            fwd += sweep_forward(case, deadline)
        bwd += sweep_backward(case, deadline)
        render(args.out, overhead, bwd, fwd)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
