"""Static analysis of the fused row kernels for H100 (sm_90), without a GPU.

    PYTHONPATH=. python benchmarks/kernel_static.py [--hidden 4096 8192 16384] [--out benchmarks/results/kernel_static.md]

Every kernel configuration the library launches (op × variant × λ mode × H × dtype, with the
launch's warps and constexpr switches) is compiled by Triton for ``GPUTarget("cuda", 90, 32)``
with the same argument specialisation the JIT uses (16-byte aligned pointers and strides), then
inspected with the ``ptxas`` / ``cuobjdump`` shipped in the triton wheel:

* regs, spill bytes (``ptxas -v`` on Triton's PTX) and stack;
* SASS instructions per element: forward = instructions of the (branch-free) row program ÷
  elements per thread; backward = instructions of the persistent row loop body ÷ elements per
  thread, plus prologue/epilogue amortised over the rows one program walks (M = 4096, 132 SMs);
* MUFU (special-function) instructions and CTA barriers (BAR.SYNC) per row;
* the bandwidth ceiling those imply on an H100 SXM (model below).

The SPLIT backward (``bwd split``: wide rows, and a learnable per-channel λ at 8192) is two
kernels: a row-sums pass (one program per row, CHUNK columns per step) and a column-tiles pass
(TILE columns × a block of rows per program).  Its row shows the larger register count, the
spills of both, instructions and MUFU per element of both added, their barriers per row, warps
as "sums+tiles", and a traffic that includes the second read of x and dy (the tiles pass) and
the per-row records (statistics, coefficients) each tile program reads.

Model (H100 SXM5: 132 SMs, 1.755 GHz sustained SM clock, 3.35 TB/s HBM3): per SM and clock the
four schedulers issue 128 thread-instructions and the MUFU pipe retires 16.  Per element the
kernel needs t_issue = max(instr/128, mufu/16) / (132 · 1.755e9) seconds of SM time and
t_mem = bytes / 3.35e12 of HBM time, where bytes counts the essential traffic (forward: x in,
y out; backward: x and dy in, dx out) plus the overhead (per-row statistics; the backward's
partial buffer, written and read once, 132 × K × H fp32).  Ceiling = essential bytes /
(3.35e12 · max(t_issue, t_mem)), as a fraction of HBM bandwidth.  It ignores latency hiding
(occupancy is printed as resident warps per SM) and assumes every issue slot is usable, so
it is an upper bound, not a prediction.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ibnorm.kernels import rownorm_op as R
from ibnorm.kernels.triton_rownorm import (OP_CODES, ibnorm_row_bwd_kernel, ibnorm_row_fwd_kernel, ibnorm_row_sums_kernel,
                                           ibnorm_row_tiles_bwd_kernel)

SMS, CLOCK, HBM = 132, 1.755e9, 3.35e12
ISSUE_PER_CLK, MUFU_PER_CLK = 128, 16
ROWS = 4096
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
DT = {"bf16": ("bf16", 2), "fp16": ("fp16", 2), "fp32": ("fp32", 4)}
POINTERS_F32 = {"LAM", "STATS", "PART", "COEF"}
POINTERS = POINTERS_F32 | {"X", "Y", "W", "B", "DY", "DX"}
FLOATS = {"eps", "delta"}


@dataclass
class Stat:
    regs: int
    spill: int
    stack: int
    instr: float
    mufu: float
    barriers: float
    warps_per_sm: int


def compile_kernel(fn, dtype: str, constexprs: dict, num_warps: int):
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in FLOATS:
            sig[name] = "fp32"
        elif name in POINTERS:
            sig[name] = "*fp32" if name in POINTERS_F32 else f"*{DT[dtype][0]}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:  # strides and M: multiples of 16 in every measured shape
            sig[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def ptxas_usage(ptx: str) -> tuple[int, int]:
    arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = subprocess.run([os.path.join(BIN, "ptxas"), f"-arch={arch}", "-v", path, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spill = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", out))
    return regs, spill


def sass_lines(cubin: bytes) -> list[str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                             check=True).stdout
    lines = []
    for line in out.splitlines():
        label = re.match(r"^\s*\.(L_x_\d+):", line)
        if label:
            lines.append("LABEL " + label.group(1))
            continue
        ins = re.match(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if ins:
            # branch targets print as labels or as addresses: keep the address as a label too
            lines.append(f"ADDR {int(ins.group(1), 16)}")
            lines.append(ins.group(2).strip())
    return lines


def loop_split(lines: list[str]) -> tuple[list[str], list[str]]:
    """(loop body, everything else) for the outermost backward branch; no loop → ([], all)."""
    labels = {l.split()[1]: i for i, l in enumerate(lines) if l.startswith(("LABEL", "ADDR"))}
    best = None
    for i, l in enumerate(lines):
        m = re.search(r"\bBRA\b.*?(?:\(\.(L_x_\d+)\)|\b0x([0-9a-f]+))", l)
        target = None if m is None else (m.group(1) or str(int(m.group(2), 16)))
        if target is not None and labels.get(target, i + 1) < i:
            start = labels[target]
            if best is None or i - start > best[1] - best[0]:
                best = (start, i)
    if best is None:
        return [], lines
    return lines[best[0] : best[1] + 1], lines[: best[0]] + lines[best[1] + 1 :]


def count(lines: list[str]) -> tuple[int, int, int]:
    ins = [l for l in lines if not l.startswith(("LABEL", "ADDR"))]
    return len(ins), sum("MUFU" in l for l in ins), sum(re.search(r"\bBAR\.(SYNC|RED)", l) is not None for l in ins)


def kernel_stat(k, per_thread: float, amortise: float, warps: int, rows: float = 1.0) -> Stat:
    """``per_thread``: elements a thread handles per loop iteration (or in all, without a loop);
    ``amortise``: loop iterations per program (the code outside the loop runs once per program);
    ``rows``: rows one program handles (for barriers per row)."""
    regs, spill = ptxas_usage(k.asm["ptx"])
    lines = sass_lines(k.asm["cubin"])
    body, rest = loop_split(lines)
    n_body, m_body, b_body = count(body)
    n_rest, m_rest, b_rest = count(rest)
    if not body:
        amortise = 1.0
    instr = (n_body + n_rest / amortise) / per_thread
    mufu = (m_body + m_rest / amortise) / per_thread
    stack = int(re.search(r"STACK:(\d+)", cuobjdump_res(k.asm["cubin"])).group(1))
    threads = 32 * warps
    ctas = min(65536 // max(regs * threads, 1), 2048 // threads, 32)
    barriers = (b_body * amortise + b_rest) / rows
    return Stat(regs, spill, stack, instr, mufu, barriers, ctas * warps)


def split_programs(cfg, h: int) -> tuple[int, int]:
    """(tile programs per row block, row blocks) of the SPLIT backward for ROWS rows on SMS SMs."""
    tiles, _, blocks = R.split_grid(ROWS, h, min(cfg.tile, R._block(h)), cfg.tiles_per_sm, SMS)
    return tiles, blocks


def analyse(kind: str, op: str, centered: bool, per_channel: bool, h: int, dtype: str) -> Stat:
    block = R._block(h)
    common = dict(HAS_W=True, LAM_PER_CHANNEL=per_channel, CENTERED=centered, OP=OP_CODES[op], N=h)
    if kind == "fwd":
        warps = int(os.environ.get("IBNORM_STATIC_FWD_WARPS", 0)) or R.forward_warps(block, centered)
        k = compile_kernel(ibnorm_row_fwd_kernel, dtype, dict(common, HAS_B=centered, BLOCK=block), warps)
        return kernel_stat(k, block / (32 * warps), 1.0, warps)
    cfg = R.backward_config(block, centered, per_channel, op, DT[dtype][1])
    warps = int(os.environ.get("IBNORM_STATIC_BWD_WARPS", 0)) or cfg.warps
    needs = dict(NEED_DX=True, NEED_DW=True, NEED_DB=centered, NEED_DLAM=per_channel)
    if cfg.split:
        chunk, tile = min(cfg.chunk, block), min(cfg.tile, block)
        sums = compile_kernel(ibnorm_row_sums_kernel, dtype, dict(common, CHUNK=chunk), warps)
        tiles = compile_kernel(ibnorm_row_tiles_bwd_kernel, dtype, dict(common, TILE=tile, **needs), cfg.tile_warps)
        _, blocks = split_programs(cfg, h)
        a = kernel_stat(sums, chunk / (32 * warps), h / chunk, warps)
        b = kernel_stat(tiles, tile / (32 * cfg.tile_warps), ROWS / blocks, cfg.tile_warps, ROWS / blocks)
        # Per element both passes run, one after the other: instructions and MUFU add up.
        return Stat(max(a.regs, b.regs), a.spill + b.spill, max(a.stack, b.stack), a.instr + b.instr,
                    a.mufu + b.mufu, a.barriers + b.barriers, min(a.warps_per_sm, b.warps_per_sm))
    prefetch = os.environ.get("IBNORM_STATIC_PREFETCH", str(int(cfg.prefetch))) == "1"
    k = compile_kernel(ibnorm_row_bwd_kernel, dtype, dict(common, BLOCK=block, PREFETCH=prefetch, **needs),
                       warps)
    return kernel_stat(k, block / (32 * warps), ROWS / SMS, warps, ROWS / SMS)


def cuobjdump_res(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout


def ceiling(kind: str, st: Stat, h: int, dtype: str, centered: bool, per_channel: bool) -> float:
    size = DT[dtype][1]
    essential = (2 if kind == "fwd" else 3) * size
    overhead = 32 / h  # per-row statistics, written by the forward, read by the backward
    if kind == "bwd":
        k = 1 + centered + per_channel
        cfg = R.backward_config(R._block(h), centered, per_channel, "tanh", size)
        programs = split_programs(cfg, h)[1] if cfg.split else SMS
        overhead += programs * k * 4 * 2 / ROWS  # partial buffer written and read once
        if cfg.split:  # the tiles pass reads x and dy again, the row statistics and coefficients once per tile
            tiles = split_programs(cfg, h)[0]
            overhead += 2 * size + (32 + 32 * tiles + 32 * (1 + tiles)) / h
    t_issue = max(st.instr / ISSUE_PER_CLK, st.mufu / MUFU_PER_CLK) / (SMS * CLOCK)
    t_mem = (essential + overhead) / HBM
    return essential / (HBM * max(t_issue, t_mem))


def meets(kind: str, st: Stat, ceil: float) -> str:
    """The issue's static targets: no spills, ceiling ≥ 70% forward, ≥ 55% backward."""
    ok = st.spill == 0 and ceil >= (0.70 if kind == "fwd" else 0.55)
    return "yes" if ok else "**no**"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", nargs="+", type=int, default=[4096, 8192, 16384])
    ap.add_argument("--dtypes", nargs="+", default=["bf16"])
    ap.add_argument("--ops", nargs="+", default=["tanh", "log", "power"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cols = ["kernel", "variant", "op", "λ", "dtype", "H", "warps", "regs", "spill B", "stack B", "SASS instr/elem",
            "MUFU/elem", "barriers/row", "warps/SM", "ceiling % HBM", "target"]
    rows = []
    for kind in ("fwd", "bwd"):
        for centered in (False, True):
            for op in args.ops:
                for per_channel in (False, True):
                    for dtype in args.dtypes:
                        for h in args.hidden:
                            st = analyse(kind, op, centered, per_channel, h, dtype)
                            block = R._block(h)
                            cfg = R.backward_config(block, centered, per_channel, op, DT[dtype][1])
                            warps = str(R.forward_warps(block, centered)) if kind == "fwd" else (
                                f"{cfg.warps}+{cfg.tile_warps}" if cfg.split else str(cfg.warps))
                            name = "bwd split" if kind == "bwd" and cfg.split else kind
                            lam = ("per-channel, learnable" if per_channel else "scalar, fixed") if kind == "bwd" else (
                                "per-channel" if per_channel else "scalar")
                            rows.append([name, "layer" if centered else "rms", op, lam, dtype, str(h), warps,
                                         str(st.regs), str(st.spill), str(st.stack), f"{st.instr:.1f}", f"{st.mufu:.2f}",
                                         f"{st.barriers:.0f}", str(st.warps_per_sm),
                                         f"{100 * ceiling(kind, st, h, dtype, centered, per_channel):.0f}%",
                                         meets(kind, st, ceiling(kind, st, h, dtype, centered, per_channel))])
                            print(" | ".join(rows[-1]), flush=True)
    render(args, cols, rows)


def render(args, cols: list[str], rows: list[list[str]]) -> None:
    cmd = "PYTHONPATH=. python " + " ".join(shlex.quote(a) for a in sys.argv)
    lines = ["# Static analysis of the fused row kernels for H100 (sm_90)", "",
             f"command: `{cmd}`", "",
             f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores (no GPU needed); "
             f"triton {triton.__version__}, ptxas/cuobjdump from the triton wheel", "",
             "Backward gradients: dx, dγ, dβ (layer), dλ (learnable λ only). Model: see the docstring of "
             "benchmarks/kernel_static.py (132 SMs × 128 issue/clk at 1.755 GHz, MUFU 16/clk/SM, 3.35 TB/s; "
             "ceiling = essential bytes ÷ max(issue time, traffic time incl. stats and partials)).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
