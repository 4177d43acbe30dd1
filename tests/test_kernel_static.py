"""The static targets of the fused kernels hold (benchmarks/kernel_static.py, compiled offline for sm_90).

Each case is one of the tightest rows of benchmarks/results/kernel_static.md, compiled by Triton for
an H100 and read back with the ptxas/cuobjdump shipped in the triton wheel (no GPU): no spills, and a
bandwidth ceiling at or above the target (forward 70%, backward 55% of HBM).  A change that makes
the kernels spill or issue-bound fails here, not only when the table is regenerated.  It runs in a
child process: the other kernel tests import the kernels under TRITON_INTERPRET=1, which cannot compile.
"""

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
ROOT = os.path.join(os.path.dirname(__file__), "..")
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(BIN, "ptxas")), reason="the triton wheel ships no ptxas")

CASES = [  # kind, op, centered, per-channel λ, H
    ("fwd", "log", True, True, 16384),  # the layer forward with a per-channel λ: the forward's tightest
    ("bwd", "log", True, True, 8192),  # the split backward with dλ and dβ: the backward's tightest
    ("bwd", "power", True, True, 16384),
    ("bwd", "tanh", True, False, 4096),  # the one-block backward, 2 programs per SM
]

CHILD = """
import json, sys
sys.path.insert(0, "benchmarks")
import kernel_static as K
out = []
for kind, op, centered, per_channel, h in json.loads(sys.argv[1]):
    st = K.analyse(kind, op, centered, per_channel, h, "bf16")
    out.append([st.spill, K.ceiling(kind, st, h, "bf16", centered, per_channel), st.instr])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def results():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.path.abspath(ROOT)
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(CASES)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dict(zip(map(tuple, CASES), json.loads(proc.stdout.strip().splitlines()[-1])))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_static_targets(results, case):
    spill, ceiling, instr = results[case]
    assert spill == 0, f"{spill} B spilled"
    assert ceiling >= (0.70 if case[0] == "fwd" else 0.55), f"ceiling {ceiling:.0%} ({instr:.1f} instr/elem)"
