"""GPU benchmark of the fused IBNorm row kernels.

    python benchmarks/bench_kernels_gpu.py [--dtypes bf16 fp32] [--out benchmarks/results/kernels_<device>.md]

Shapes M×H = 4096×{1024, 4096, 8192, 16384} and 65536×128 (q/k-norm-like). Columns: forward ms,
forward+backward ms, achieved GB/s (forward reads x and writes y; backward reads x and dy and writes dx),
% of the device's measured copy bandwidth, and the time ratio against the eager reference,
torch.compile of the reference, torch's own F.rms_norm / F.layer_norm, and Liger-Kernel where installed.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from _common import print_and_save, time_ms  # noqa: E402
from ibnorm import functional as IBF  # noqa: E402

SHAPES = [(4096, 1024), (4096, 4096), (4096, 8192), (4096, 16384), (65536, 128)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def copy_bandwidth_gbs() -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second)."""
    src = torch.empty(512 * 1024 * 1024 // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), warmup=5, reps=20, sync=torch.cuda.synchronize)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def liger(centered: bool, h: int, dtype):
    try:
        if centered:
            from liger_kernel.transformers import LigerLayerNorm

            return LigerLayerNorm(h).to("cuda", dtype)
        from liger_kernel.transformers import LigerRMSNorm

        return LigerRMSNorm(h).to("cuda", dtype)
    except Exception:
        return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"])
    ap.add_argument("--ops", nargs="+", default=["tanh"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    os.environ["IBNORM_KERNEL"] = "triton"
    from ibnorm.kernels.dispatch import row_norm

    sync = torch.cuda.synchronize
    bw = copy_bandwidth_gbs()
    compiled_ref = torch.compile(IBF.ib_row_norm, dynamic=False)
    cols = ["variant", "op", "dtype", "M×H", "fwd ms", "fwd+bwd ms", "fwd GB/s", "bwd GB/s", "fwd % copy bw",
            "fwd+bwd % copy bw", "× eager ref", "× compiled ref", "× torch norm", "× liger"]
    rows = []
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for centered in (False, True):
            for op in args.ops:
                for m, h in SHAPES:
                    x = torch.randn(m, h, device="cuda", dtype=dtype)
                    w = torch.randn(h, device="cuda", dtype=dtype, requires_grad=True)
                    b = torch.randn(h, device="cuda", dtype=dtype, requires_grad=True) if centered else None
                    lam = (torch.rand(h, device="cuda") * 0.3).requires_grad_()
                    dy = torch.randn_like(x)
                    xg = x.clone().requires_grad_()
                    args_ = ((h,), w, b, lam, op, 1e-6, centered)

                    def fwd(fn):
                        with torch.no_grad():
                            fn(x, *args_)

                    def fb(fn):
                        y = fn(xg, *args_)
                        y.backward(dy)

                    torch_norm = (lambda x_, s, w_, b_, *_: F.layer_norm(x_, s, w_, b_, 1e-6)) if centered else (lambda x_, s, w_, b_, *_: F.rms_norm(x_, s, w_, 1e-6))
                    t = {name: (time_ms(lambda: fwd(fn), 3, 10, sync), time_ms(lambda: fb(fn), 3, 10, sync))
                         for name, fn in (("ours", row_norm), ("eager", IBF.ib_row_norm), ("compiled", compiled_ref), ("torch", torch_norm))}
                    lg = liger(centered, h, dtype)
                    if lg is not None:
                        t["liger"] = (time_ms(lambda: lg(x), 3, 10, sync), time_ms(lambda: lg(xg).backward(dy), 3, 10, sync))
                    nbytes = x.numel() * x.element_size()
                    f_ms, fb_ms = t["ours"]
                    bwd_ms = max(fb_ms - f_ms, 1e-6)
                    ratio = lambda k: f"{fb_ms / t[k][1]:.2f}" if k in t else "-"
                    rows.append(["layer" if centered else "rms", op, dname, f"{m}×{h}", f"{f_ms:.3f}", f"{fb_ms:.3f}",
                                 f"{2 * nbytes / f_ms / 1e6:.0f}", f"{3 * nbytes / bwd_ms / 1e6:.0f}",
                                 f"{100 * 2 * nbytes / f_ms / 1e6 / bw:.0f}%", f"{100 * 5 * nbytes / fb_ms / 1e6 / bw:.0f}%",
                                 ratio("eager"), ratio("compiled"), ratio("torch"), ratio("liger")])
                    print(rows[-1], flush=True)
    title = f"IBNorm fused row kernels, {torch.cuda.get_device_name()}, copy bandwidth {bw:.0f} GB/s (ratios: fwd+bwd time of ours ÷ theirs)"
    dev = torch.cuda.get_device_name().replace(" ", "_")
    print_and_save(args.out or f"benchmarks/results/kernels_{dev}.md", title, cols, rows, width=240)

if __name__ == "__main__":
    main()
