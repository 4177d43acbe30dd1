"""CPU micro-benchmark: IBNorm (reference, eager and torch.compile) against torch's own norms.

    python benchmarks/bench_layers_cpu.py [--quick] [--out benchmarks/results/layers_cpu.md]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import ibnorm  # noqa: E402
from _common import print_and_save, time_ms  # noqa: E402


def cases(quick: bool):
    rows = [(2048, 768), (512, 4096)] if not quick else [(256, 256)]
    for m, h in rows:
        yield "rms", f"{m}x{h}", nn.RMSNorm(h, eps=1e-6), (m, h)
        yield "layer", f"{m}x{h}", nn.LayerNorm(h), (m, h)
    img = (32, 64, 28, 28) if not quick else (4, 16, 8, 8)
    yield "batch", "x".join(map(str, img)), nn.BatchNorm2d(img[1]), img
    yield "group", "x".join(map(str, img)), nn.GroupNorm(8, img[1]), img


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--out", default="benchmarks/results/layers_cpu.md")
    args = ap.parse_args()
    torch.manual_seed(0)
    columns = ["variant", "op", "shape", "torch fwd ms", "ib fwd ms", "fwd ratio", "torch fwd+bwd ms", "ib fwd+bwd ms", "fwd+bwd ratio",
               "compiled ib fwd+bwd ms", "compiled ratio"]
    rows = []
    for variant, shape_name, base, shape in cases(args.quick):
        x = torch.randn(shape)
        xg = x.clone().requires_grad_()

        def fwd(m):
            with torch.no_grad():
                return m(x)

        def fwd_bwd(m):
            xg.grad = None
            m(xg).sum().backward()

        base.train()
        t_fwd, t_fb = time_ms(lambda: fwd(base)), time_ms(lambda: fwd_bwd(base))
        for op in ibnorm.COMPRESSION_OPS:
            ib = ibnorm.from_module(base, op=op, lam=0.5)
            i_fwd, i_fb = time_ms(lambda: fwd(ib)), time_ms(lambda: fwd_bwd(ib))
            torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no eager fallback
            compiled = torch.compile(ibnorm.from_module(base, op=op, lam=0.5))
            c_fb = time_ms(lambda: fwd_bwd(compiled), warmup=3)
            rows.append([variant, op, shape_name, f"{t_fwd:.3f}", f"{i_fwd:.3f}", f"{i_fwd / t_fwd:.2f}", f"{t_fb:.3f}", f"{i_fb:.3f}",
                         f"{i_fb / t_fb:.2f}", f"{c_fb:.3f}", f"{c_fb / t_fb:.2f}"])
    title = "IBNorm reference vs torch norms, CPU, float32, train mode, λ = 0.5"
    print_and_save(args.out, title, columns, rows)


if __name__ == "__main__":
    main()
