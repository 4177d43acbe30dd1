"""GPU benchmark of the fused IBNorm row kernels, trustworthy by construction.

    PYTHONPATH=. python benchmarks/bench_kernels_gpu.py [--out kernels_gpu.md] [--dtype bf16] [--budget-s 200]

* Timing: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every run, median).
* Forward is timed under ``no_grad``; the backward alone with ``torch.autograd.grad`` on a graph
  built once (``retain_graph``), so nothing accumulates into ``.grad`` and nothing is subtracted.
* Before any timing, our forward and every gradient are asserted against the eager reference
  (``ibnorm.functional``, fp32 compute) and the compiled reference against the eager one.
* One compiled reference per shape (``torch._dynamo.reset()`` before each ``torch.compile``).
* Liger-Kernel (if importable) runs with ``in_place=False`` on its own copy of dy.
* Bandwidth: forward moves x in and y out (2·M·H elements), backward x and dy in and dx out
  (3·M·H); the per-row statistics and the per-program partial sums are not counted.
  "% copy" is against a measured device-to-device copy of 1 GiB.
Ratios: "÷ torch" = our time / F.rms_norm or F.layer_norm time (target ≤ 1.2);
"× eager", "× compiled", "× liger" = their time / our time (speed-ups).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SHAPES = [(4096, 4096), (4096, 8192), (4096, 16384)]
# IBNORM_BENCH_SMOKE=1: a CPU dry run of the whole script (tiny shapes, interpreter, one wall-clock
# run per timing) so the script itself is tested without a GPU.  Its numbers mean nothing.
SMOKE = os.environ.get("IBNORM_BENCH_SMOKE") == "1"
DEV = "cpu" if SMOKE else "cuda"
if SMOKE:
    SHAPES = [(8, 64), (4, 128)]


def bench_ms(fn) -> float:
    if SMOKE:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=40, return_mode="median")


def flushed_graph_ms(fn) -> float:
    """GPU time of ``fn`` alone, L2 flushed before each run: ``fn`` captured once as a CUDA graph, so
    the host's launch cost (which exceeds the kernels' time for an eager backward) is not counted."""
    if SMOKE:
        return bench_ms(fn)
    from triton.testing import do_bench

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (compile, allocate) outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=10, rep=40, return_mode="median")


def copy_bandwidth_gbs() -> float:
    src = torch.empty(1 << (16 if SMOKE else 30), dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (bench_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9


def torch_norm(centered: bool, eps: float):
    if centered:
        return lambda x, shape, w, b, lam, op, eps_, c: F.layer_norm(x, shape, w, b, eps)
    return lambda x, shape, w, b, lam, op, eps_, c: F.rms_norm(x, shape, w, eps)


def liger_norm(centered: bool, h: int, eps: float, w, b):
    try:
        if centered:
            from liger_kernel.transformers import LigerLayerNorm

            mod = LigerLayerNorm(h, eps=eps)
        else:
            from liger_kernel.transformers import LigerRMSNorm

            mod = LigerRMSNorm(h, eps=eps, in_place=False)
    except Exception:
        return None
    mod = mod.to(device=DEV, dtype=w.dtype)
    with torch.no_grad():
        mod.weight.copy_(w)
        if centered:
            mod.bias.copy_(b)
    return lambda x, *_: mod(x)


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()


class Case:
    """Inputs of one benchmark row; ``inputs`` are the leaves gradients are taken for."""

    def __init__(self, m: int, h: int, dtype, centered: bool, learnable_lam: bool):
        g = torch.Generator(device=DEV).manual_seed(0)
        self.h, self.centered, self.eps = h, centered, 1e-5
        self.x = torch.randn(m, h, device=DEV, dtype=dtype, generator=g).requires_grad_()
        self.w = (1 + 0.1 * torch.randn(h, device=DEV, dtype=dtype, generator=g)).requires_grad_()
        self.b = torch.randn(h, device=DEV, dtype=dtype, generator=g).requires_grad_() if centered else None
        if learnable_lam:
            self.lam = (0.5 * torch.rand(h, device=DEV, generator=g)).requires_grad_()
        else:
            self.lam = torch.tensor(0.5, device=DEV)
        self.dy = torch.randn(m, h, device=DEV, dtype=dtype, generator=g)
        self.inputs = [t for t in (self.x, self.w, self.b, self.lam) if t is not None and t.requires_grad]

    def call(self, fn, op: str):
        return fn(self.x, (self.h,), self.w, self.b, self.lam, op, self.eps, self.centered)

    def timings(self, fn, op: str) -> tuple[float, float]:
        def fwd():
            with torch.no_grad():
                self.call(fn, op)

        y = self.call(fn, op)
        dy = self.dy.clone()  # a kernel that writes into dy cannot disturb the others
        bwd = lambda: torch.autograd.grad(y, self.inputs, dy, retain_graph=True, allow_unused=True)
        return bench_ms(fwd), bench_ms(bwd)

    def outputs(self, fn, op: str) -> list[torch.Tensor]:
        y = self.call(fn, op)
        return [y.detach()] + list(torch.autograd.grad(y, self.inputs, self.dy.clone()))


def check(name: str, got: list[torch.Tensor], want: list[torch.Tensor], tol: float) -> None:
    for i, (a, b) in enumerate(zip(got, want)):
        err = max_rel(a, b)
        if not err < tol:
            raise SystemExit(f"error: {name} output {i} differs from the eager reference by {err:.3g} (tolerance {tol})")


def run_case(args, case: Case, op: str, bw: float, deadline: float) -> list[str]:
    from ibnorm import functional as IBF
    from ibnorm.kernels.dispatch import row_norm

    tol = 3e-2 if case.x.dtype != torch.float32 else 1e-3
    eager = case.outputs(IBF.ib_row_norm, op)
    check("fused kernel", case.outputs(row_norm, op), eager, tol)
    t = {"ours": case.timings(row_norm, op), "eager": case.timings(IBF.ib_row_norm, op),
         "torch": case.timings(torch_norm(case.centered, case.eps), op)}
    if time.time() < deadline and not (SMOKE and os.environ.get("IBNORM_BENCH_SMOKE_COMPILE") != "1"):
        torch._dynamo.reset()  # one fresh compiled baseline per shape: no recompile-limit fallback to eager
        # The backward is replayed on one graph (retain_graph), which donated buffers forbid.
        torch._functorch.config.donated_buffer = False
        compiled = torch.compile(IBF.ib_row_norm, dynamic=False)
        check("compiled reference", case.outputs(compiled, op), eager, tol)
        t["compiled"] = case.timings(compiled, op)
    lg = liger_norm(case.centered, case.h, case.eps, case.w.detach(), None if case.b is None else case.b.detach())
    if lg is not None:
        t["liger"] = case.timings(lg, op)
    f_ms, b_ms = t["ours"]
    n = case.x.numel() * case.x.element_size()
    f_gbs, b_gbs = 2 * n / f_ms / 1e6, 3 * n / b_ms / 1e6

    def speedup(key: str) -> str:
        return f"{t[key][0] / f_ms:.2f} / {t[key][1] / b_ms:.2f}" if key in t else "-"

    return [
        "layer" if case.centered else "rms", op, "learnable per-channel" if case.lam.requires_grad else "fixed scalar",
        f"{case.x.shape[0]}×{case.h}", f"{f_ms * 1e3:.0f}", f"{b_ms * 1e3:.0f}",
        f"{f_gbs:.0f} ({100 * f_gbs / bw:.0f}%)", f"{b_gbs:.0f} ({100 * b_gbs / bw:.0f}%)",
        f"{f_ms / t['torch'][0]:.2f} / {b_ms / t['torch'][1]:.2f}", speedup("eager"), speedup("compiled"), speedup("liger"),
    ]


CHANNEL_SHAPE = (32, 256, 28, 28) if not SMOKE else (2, 8, 4, 4)
CHANNEL_COLUMNS = ["variant", "N×C×H×W", "path", "fwd µs", "bwd µs", "÷ torch norm (fwd / bwd)", "× eager ref (fwd / bwd)"]


def run_channel_case(kind: str, dtype) -> list[str]:
    """IBBatchNorm2d (training) / IBGroupNorm on CUDA: the compiled path against eager and torch."""
    import ibnorm

    n, c, h, w = CHANNEL_SHAPE
    if kind == "batch":
        ours, base = ibnorm.IBBatchNorm2d(c, op="tanh", lam=0.5), torch.nn.BatchNorm2d(c)
    else:
        ours, base = ibnorm.IBGroupNorm(32 if c >= 32 else 2, c, op="tanh", lam=0.5), torch.nn.GroupNorm(32 if c >= 32 else 2, c)
    ours, base = ours.to(DEV, dtype), base.to(DEV, dtype)
    x = torch.randn(n, c, h, w, device=DEV, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)

    def timings(mod, mode: str) -> tuple[float, float, torch.Tensor]:
        os.environ["IBNORM_KERNEL"] = mode
        y = mod(x)
        out = y.detach().clone()
        with torch.no_grad():
            f = bench_ms(lambda: mod(x))
        b = bench_ms(lambda: torch.autograd.grad(y, [x, mod.weight], dy, retain_graph=True))
        return f, b, out

    fc, bc, yc = timings(ours, "auto")
    fe, be, ye = timings(ours, "reference")
    ft, bt, _ = timings(base, "reference")
    os.environ["IBNORM_KERNEL"] = "triton"
    err = max_rel(yc, ye)
    if not err < 3e-2:
        raise SystemExit(f"error: compiled {kind} path differs from the eager reference by {err:.3g}")
    path = "compiled" if torch.cuda.is_available() else "reference (CPU smoke)"
    return [kind, "×".join(map(str, CHANNEL_SHAPE)), path, f"{fc * 1e3:.0f}", f"{bc * 1e3:.0f}",
            f"{fc / ft:.2f} / {bc / bt:.2f}", f"{fe / fc:.2f} / {be / bc:.2f}"]


COLUMNS = ["variant", "op", "λ", "M×H", "fwd µs", "bwd µs", "fwd GB/s (% copy)", "bwd GB/s (% copy)",
           "÷ torch norm (fwd / bwd)", "× eager ref", "× compiled ref", "× liger"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--ops", nargs="+", default=["tanh"])
    ap.add_argument("--extra-ops-shape", default="4096x8192", help="shape at which the other ops and a learnable λ run")
    ap.add_argument("--budget-s", type=float, default=200.0, help="stop compiling baselines after this many seconds")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not SMOKE and not torch.cuda.is_available():
        raise SystemExit("error: needs a CUDA GPU")
    os.environ["IBNORM_KERNEL"] = "triton"
    deadline = time.time() + args.budget_s
    dtype = DTYPES[args.dtype]
    bw = copy_bandwidth_gbs()
    em, eh = (int(v) for v in args.extra_ops_shape.split("x")) if not SMOKE else (4, 96)
    plan = [(m, h, c, op, False) for c in (False, True) for (m, h) in SHAPES for op in args.ops]
    plan += [(em, eh, c, op, True) for c in (False, True) for op in ("tanh", "log", "power")]
    rows = []
    for m, h, centered, op, learnable in plan:
        rows.append(run_case(args, Case(m, h, dtype, centered, learnable), op, bw, deadline))
        print(" | ".join(rows[-1]), flush=True)
        render(args, rows, bw, dtype, quiet=True)  # a partial table survives a timeout
        if not SMOKE:
            torch.cuda.empty_cache()
    channel_rows = []
    for kind in ("batch", "group"):
        if time.time() < deadline + 40 or SMOKE:  # each compiles one forward and one backward
            channel_rows.append(run_channel_case(kind, dtype))
            print(" | ".join(channel_rows[-1]), flush=True)
    render(args, rows, bw, dtype, channel_rows=channel_rows)


def render(args, rows: list[list[str]], bw: float, dtype, quiet: bool = False, channel_rows=()) -> None:
    import triton

    cmd = "PYTHONPATH=. python " + " ".join(shlex.quote(a) for a in sys.argv)
    device = "CPU smoke run (numbers meaningless)" if SMOKE else torch.cuda.get_device_name()
    lines = [f"# IBNorm fused row kernels on {device}", "",
             f"command: `{cmd}`", "",
             f"torch {torch.__version__}, triton {triton.__version__}, dtype {str(dtype).split('.')[-1]}, "
             f"measured copy bandwidth {bw:.0f} GB/s (1 GiB device-to-device, read + write)", "",
             "Timing: triton.testing.do_bench (CUDA events, L2 flush, median). Backward alone via torch.autograd.grad. "
             "Ratios: ÷ torch = our time / torch's; × = their time / ours (fwd / bwd). '-' = not available.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if channel_rows:
        lines += ["", "Batch/group variants (ResNet-style, training mode; backward = dx and dγ):", "",
                  "| " + " | ".join(CHANNEL_COLUMNS) + " |", "|" + "---|" * len(CHANNEL_COLUMNS)]
        lines += ["| " + " | ".join(r) + " |" for r in channel_rows]
    text = "\n".join(lines) + "\n"
    if not quiet:
        print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
