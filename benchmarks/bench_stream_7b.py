"""Streaming conversion of a random-weight LLaMA-7B-shaped checkpoint: wall time, time per block, peak memory.

    python benchmarks/bench_stream_7b.py [--size 7b|tiny] [--layers N] [--dir DIR] [--calib-samples 8] [--seq-len 256]
        [--skip-calibrated] [--isa native|avx2|both] [--out benchmarks/results/stream_7b.md]

Generates (once) a checkpoint with the real Llama-2-7B config in bf16 (``--size tiny``: 256 wide, 4 blocks, for
checking the script; ``--layers N``: that many blocks), sharded safetensors (2 GB shards), with a small BPE
tokenizer trained on builtin text. Then, each as a child process whose peak resident memory is read from the OS:

* the baseline: a plain transformers load + save_pretrained of the same checkpoint;
* ``ibnorm convert --stream always --lam 0.1`` (no calibration), and ``ibnorm inspect`` of the result;
* the calibrated streamed conversion, through the library call ``ibnorm convert --calib`` makes
  (``ibnorm.convert_checkpoint``), with a progress callback that times each block;
* one float32 forward over the same calibration tokens, in convert's batches of 4, estimated block-wise: block 0
  (float32, read from the checkpoint) and the final norm + head are timed, forward = layers × block + head (the
  whole 7B model in float32 is 27 GB). Calibration computes in float32, so its cost reads in these passes:
  (calibrated − fixed-λ convert) ÷ that forward (the target is ≤ 3);
* one forward of the source as transformers loads it (bf16), and ``ibnorm.load`` of the result.

``--isa avx2`` runs the conversions and the float32 forward (not the baseline, nor the bf16 forward, which is
emulated there and takes hours) again, in child processes with ATen's kernels, oneDNN (torch's bf16 matmuls) and
MKL (float32 GEMM) limited to AVX2 (AVX2_ENV); ``both`` puts the two measurements side by side. The CPU's vector
features are printed, and a small bf16 vs float32 matmul is timed under each variable, to show which of them a
CPU without bf16 hardware needs reproduced.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import FORWARD_SCRIPT, print_and_save  # noqa: E402

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
SIZES = {"7b": LLAMA2_7B,
         "tiny": {**LLAMA2_7B, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                  "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 8192}}
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")

# A CPU without AVX-512: ATen's own kernels, oneDNN (bf16 matmuls go there) and MKL (float32 GEMM) at AVX2.
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
PROBE_ENVS = [("default", {}),
              ("ATEN_CPU_CAPABILITY=avx2", {"ATEN_CPU_CAPABILITY": "avx2"}),
              ("+ ONEDNN_MAX_CPU_ISA=AVX2", {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}),
              ("+ MKL_ENABLE_INSTRUCTIONS=AVX2 (= --isa avx2)", AVX2_ENV)]
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def generate(directory: Path, shape: dict) -> None:
    import transformers
    from accelerate import init_empty_weights
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from ibnorm.data import read_texts
    from ibnorm.io.stream_writer import DTYPE_NAMES, PlannedTensor, ShardedWriter

    directory.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(**shape, dtype="bfloat16")
    config.save_pretrained(directory)
    with init_empty_weights():
        model = transformers.LlamaForCausalLM(config)
    params = list(model.named_parameters())
    plan = [PlannedTensor(n, DTYPE_NAMES[torch.bfloat16], tuple(p.shape)) for n, p in params]
    writer = ShardedWriter(directory, plan, 2 * 10**9)
    g = torch.Generator().manual_seed(0)
    for name, p in params:
        if "norm" in name:
            t = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        else:
            t = torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5)
        writer.write(name, t.to(torch.bfloat16))
    writer.close()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(read_texts("builtin:pydoc:all"), trainers.BpeTrainer(vocab_size=8000, special_tokens=["<unk>", "</s>"]))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(directory)


def cpu_features() -> str:
    """The vector features that decide bf16 vs float32 speed, from /proc/cpuinfo, and torch's choice."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        pass
    amx = sorted(f for f in flags if f.startswith("amx")) or ["none"]
    shown = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in CPU_FLAGS if not f.startswith("amx"))
    return f"CPU flags: {shown}, amx: {' '.join(amx)}; torch.backends.cpu.get_cpu_capability(): {torch.backends.cpu.get_cpu_capability()}"


# Each command runs under a fresh wrapper process whose RUSAGE_CHILDREN is that command's alone
# (the benchmark's own RUSAGE_CHILDREN is a running maximum over every child).
_WRAP = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
         "sys.stderr.write(f'\\nPEAK_KIB {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}\\n'); sys.exit(r.returncode)")


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Wall seconds and peak RSS (GiB) of a child process, run with ``env`` added to this one's environment."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _WRAP, *cmd], capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    peak = int(p.stderr.rsplit("PEAK_KIB", 1)[1].split()[0])
    return wall, peak / 2**20, p.stdout


BASELINE = ("import sys, transformers; m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype='auto'); "
            "m.save_pretrained(sys.argv[2], max_shard_size='5GB')")

# The calibrated conversion as `ibnorm convert SRC --out OUT --stream always --calib …` runs it, with each block timed:
#   python -c CONVERT_SCRIPT SRC OUT CALIB SAMPLES SEQ_LEN → JSON {block_s: [...], lam_mean}
CONVERT_SCRIPT = r"""
import json, sys, time
import ibnorm
marks = []
def progress(stage, done, total):
    if stage == "calibrating blocks":
        marks.append(time.perf_counter())
opts = ibnorm.ConvertOptions(calib=sys.argv[3], calib_samples=int(sys.argv[4]), seq_len=int(sys.argv[5]))
result, manifest = ibnorm.convert_checkpoint(sys.argv[1], sys.argv[2], opts, stream="always", force=True, progress=progress)
lam = [l["lam_mean"] for l in manifest["layers"]]
print(json.dumps({"block_s": [b - a for a, b in zip(marks, marks[1:])], "lam_mean": sum(lam) / len(lam),
                  "backoff": manifest["end_to_end"].get("backoff_factor")}))
"""

# One float32 forward over the calibration tokens, block-wise: block 0 and the tail (final norm + head) timed on
# the tokens' embeddings in batches of BATCH (best of 2 after a one-batch warm-up); forward = layers × block + tail.
#   python -c BLOCK_FORWARD_SCRIPT SRC CALIB SAMPLES SEQ_LEN BATCH → JSON {block_s, tail_s, layers, tokens}
BLOCK_FORWARD_SCRIPT = r"""
import json, sys, time
import torch, transformers
from transformers.models.llama import modeling_llama as L
from ibnorm.data import read_texts, token_examples
from ibnorm.io.safetensors_index import TensorIndex
src, calib, samples, seq_len, bs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
config = transformers.AutoConfig.from_pretrained(src)
config._attn_implementation = "sdpa"  # as the streamed skeleton runs
index = TensorIndex.open(src)
def weights(prefix):
    return {k[len(prefix):]: index.get(k).float() for k in index.tensors if k.startswith(prefix)}
block = L.LlamaDecoderLayer(config, 0).eval()
block.load_state_dict(weights("model.layers.0."))
norm = L.LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
norm.load_state_dict(weights("model.norm."))
head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
head.load_state_dict(weights("lm_head."))
embed = torch.nn.Embedding.from_pretrained(index.get("model.embed_tokens.weight").float())
rotary = L.LlamaRotaryEmbedding(config)
ids = token_examples(transformers.AutoTokenizer.from_pretrained(src), read_texts(calib), seq_len, samples)
def best(fn):
    times = []
    for _ in range(2):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)
with torch.no_grad():
    hidden = [embed(ids[i:i + bs]) for i in range(0, len(ids), bs)]
    pos = [rotary(h, torch.arange(h.shape[1])[None]) for h in hidden]
    block(hidden[0], position_embeddings=pos[0])
    block_s = best(lambda: [block(h, position_embeddings=p) for h, p in zip(hidden, pos)])
    tail_s = best(lambda: [head(norm(h)) for h in hidden])
print(json.dumps({"block_s": block_s, "tail_s": tail_s, "layers": config.num_hidden_layers, "tokens": int(ids.numel())}))
"""

# A small matmul, float32 and bf16, best of 5 after a warm-up → JSON {capability, onednn_bf16, fp32, bf16} (GFLOP/s)
PROBE_SCRIPT = r"""
import json, time, torch
def gflops(dtype, m=128, k=1024, n=1024):
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b
    times = []
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * m * k * n / min(times) / 1e9
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(),
                  "onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                  "fp32": gflops(torch.float32), "bf16": gflops(torch.bfloat16)}))
"""


def probe() -> tuple[list[list[str]], str]:
    """The matmul probe under each environment, and what it says about reproducing an AVX2-only CPU."""
    rows, got = [], {}
    for label, env in PROBE_ENVS:
        got[label] = r = json.loads(run([sys.executable, "-c", PROBE_SCRIPT], env)[2])
        rows.append([label, r["capability"], "yes" if r["onednn_bf16"] else "no", f"{r['fp32']:.1f}", f"{r['bf16']:.2f}",
                     f"{r['bf16'] / r['fp32']:.3f}"])
    default, aten, avx2 = got[PROBE_ENVS[0][0]], got[PROBE_ENVS[1][0]], got[PROBE_ENVS[-1][0]]
    bf16_hw = default["bf16"] > 0.5 * default["fp32"]
    if not bf16_hw:
        verdict = ("bf16 matmul is already far slower than float32 by default: this CPU has no bf16 hardware, "
                   "and the default rows are the AVX2-only measurement.")
    else:
        same = aten["bf16"] > 0.5 * default["bf16"]
        verdict = (f"ATEN_CPU_CAPABILITY=avx2 alone {'does **not** reproduce' if same else 'reproduces'} a CPU without bf16 "
                   f"hardware: bf16 matmul {aten['bf16']:.1f} GFLOP/s under it vs {default['bf16']:.1f} by default "
                   "(it limits ATen's own kernels; torch sends bf16 matmuls to oneDNN, which picks its ISA itself). "
                   f"With ONEDNN_MAX_CPU_ISA=AVX2 as well (`--isa avx2`), bf16 matmul runs at {avx2['bf16']:.2f} GFLOP/s, "
                   f"{avx2['bf16'] / avx2['fp32']:.3f}× float32 ({avx2['fp32']:.1f} GFLOP/s): emulated, as on an AVX2-only CPU. "
                   "Not limited by any of them: ibnorm's fused C norm kernel (built with -march=native), a small share of the time.")
    return rows, verdict


def conversions(src: Path, args, env: dict[str, str], tag: str) -> tuple[list[list[str]], dict]:
    """The fixed-λ and calibrated streamed conversions under ``env``; their rows and walls."""
    cli, size = [sys.executable, "-m", "ibnorm_cli"], sum(f.stat().st_size for f in src.glob("*.safetensors"))
    out = Path(f"{src}-ib")
    shutil.rmtree(out, ignore_errors=True)
    wall, peak, _ = run(cli + ["convert", str(src), "--out", str(out), "--stream", "always", "--json", "--lam", "0.1"], env)
    rows = [[f"convert --lam 0.1 (no calibration, streamed){tag}", f"{wall:.0f}", f"{peak:.2f}", f"{size / 1e9:.1f} GB in"]]
    walls = {"fixed": wall}
    info = json.loads(run(cli + ["inspect", str(out), "--json"], env)[2])
    rows.append([f"  inspect the result ({info['files']} shards, {info['tensors']} tensors)", "-", "-",
                 "λ mean {:.3f}".format(info["lambda"]["mean"])])
    if args.skip_calibrated:
        return rows, walls
    wall, peak, stdout = run([sys.executable, "-c", CONVERT_SCRIPT, str(src), str(out), "builtin:pydoc:train",
                              str(args.calib_samples), str(args.seq_len)], env)
    r, walls["calibrated"] = json.loads(stdout.strip().splitlines()[-1]), wall
    blocks = sorted(r["block_s"])
    rows.append([f"convert --calib builtin:pydoc:train ({args.calib_samples} × {args.seq_len} tokens, streamed){tag}",
                 f"{wall:.0f}", f"{peak:.2f}", f"λ mean {r['lam_mean']:.3f}, back-off ×{r['backoff']}"])
    rows.append([f"  time per block (calibration pass, {len(blocks)} blocks){tag}", f"{blocks[len(blocks) // 2]:.1f}", "-",
                 f"median; min {blocks[0]:.1f}, max {blocks[-1]:.1f}"])
    wall, peak, stdout = run([sys.executable, "-c", BLOCK_FORWARD_SCRIPT, str(src), "builtin:pydoc:train",
                              str(args.calib_samples), str(args.seq_len), "4"], env)
    f = json.loads(stdout.strip().splitlines()[-1])
    forward = f["layers"] * f["block_s"] + f["tail_s"]
    extra = walls["calibrated"] - walls["fixed"]
    rows.append([f"one float32 forward over the {f['tokens']} calibration tokens{tag}", f"{forward:.0f}", f"{peak:.2f}",
                 f"{f['layers']} × block {f['block_s']:.2f} s + norm and head {f['tail_s']:.2f} s (block 0 timed)"])
    rows.append([f"**calibration cost** (calibrated − fixed-λ convert){tag}", f"{extra:.0f}", "-",
                 f"**{extra / forward:.2f} float32 forward passes** (target ≤ 3)"])
    return rows, walls


def check_shape(src: Path, shape: dict) -> None:
    config = json.loads((src / "config.json").read_text())
    wrong = [k for k in SHAPE_KEYS if config.get(k) != shape[k]]
    if wrong:
        raise SystemExit(f"error: {src} holds a checkpoint of another shape ({wrong[0]} {config.get(wrong[0])}, "
                         f"not {shape[wrong[0]]}); remove it or choose another --dir")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SIZES), default="7b")
    ap.add_argument("--layers", type=int, default=None, help="blocks (default: the size's)")
    ap.add_argument("--dir", default=None, help="checkpoint directory (default /tmp/llama-SIZE[-LAYERS]-random)")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--skip-calibrated", action="store_true")
    ap.add_argument("--isa", choices=("native", "avx2", "both"), default="native",
                    help="avx2: the conversions in child processes limited to AVX2 (AVX2_ENV); both: side by side")
    ap.add_argument("--out", default="benchmarks/results/stream_7b.md")
    args = ap.parse_args()
    shape = {**SIZES[args.size], **({"num_hidden_layers": args.layers} if args.layers else {})}
    src = Path(args.dir or f"/tmp/llama-{args.size}{'' if args.layers is None else f'-{args.layers}l'}-random")
    features = cpu_features()
    print(features)
    rows = []
    if not (src / "config.json").exists():
        t = time.perf_counter()
        generate(src, shape)
        rows.append([f"generate random checkpoint ({args.size}, {shape['num_hidden_layers']} blocks, bf16)",
                     f"{time.perf_counter() - t:.0f}", "-", ""])
    check_shape(src, shape)
    base_out = Path(f"{src}-resaved")
    shutil.rmtree(base_out, ignore_errors=True)
    base_wall, peak, _ = run([sys.executable, "-c", BASELINE, str(src), str(base_out)])
    shutil.rmtree(base_out, ignore_errors=True)
    rows.append(["baseline: transformers from_pretrained + save_pretrained (same checkpoint)", f"{base_wall:.0f}", f"{peak:.2f}", "1.00×"])
    envs = {"native": [("", {})], "avx2": [(" [AVX2]", AVX2_ENV)], "both": [("", {}), (" [AVX2]", AVX2_ENV)]}[args.isa]
    for tag, env in envs:
        rows += conversions(src, args, env, tag)[0]
    if not args.skip_calibrated and args.isa != "avx2":
        rows += bf16_forward(src, args)
    code = ("import ibnorm, torch, sys; m = ibnorm.load(sys.argv[1]); "
            "print(m(input_ids=torch.tensor([[1, 2, 3, 4]])).logits.shape)")
    wall, peak, stdout = run([sys.executable, "-c", code, f"{src}-ib"])
    rows.append(["ibnorm.load of the result + 4-token forward", f"{wall:.0f}", f"{peak:.2f}", stdout.strip()])
    probe_rows, verdict = probe()
    title = (f"Streaming conversion of a random-weight LLaMA-7B-shaped checkpoint (bf16, 2 GB shards)" if args.size == "7b"
             and args.layers is None else f"Streaming conversion of a random-weight LLaMA checkpoint ({args.size}, "
             f"{shape['num_hidden_layers']} blocks, bf16)")
    print_and_save(args.out, title, ["step", "wall s", "peak RSS GiB", "note"], rows)
    append_cpu_section(args.out, features, probe_rows, verdict)


def bf16_forward(src: Path, args) -> list[list[str]]:
    """One forward of the source as transformers loads it (bf16, the whole model)."""
    script = [sys.executable, "-c", FORWARD_SCRIPT, str(src), "builtin:pydoc:train", str(args.calib_samples),
              str(args.seq_len), "4", "1"]
    wall, peak, stdout = run(script)
    fwd = json.loads(stdout.strip().splitlines()[-1])
    return [[f"one forward of the source over the {fwd['tokens']} calibration tokens (bf16 as loaded, batches of 4)",
             f"{fwd['forward_s']:.0f}", f"{peak:.2f}", f"load {fwd['load_s']:.0f} s, not counted"]]


def append_cpu_section(path: str, features: str, probe_rows: list[list[str]], verdict: str) -> None:
    """The CPU's vector features and the matmul probe, after the table (printed too)."""
    columns = ["environment", "torch capability", "oneDNN bf16", "fp32 GFLOP/s", "bf16 GFLOP/s", "bf16 ÷ fp32"]
    lines = ["", "## CPU", "", features, "",
             "Calibration computes in float32 (`ibnorm/pipeline/stores.py`, `COMPUTE_DTYPE`); `[AVX2]` rows ran with "
             + " ".join(f"`{k}={v}`" for k, v in AVX2_ENV.items()) + ".", "",
             "A 128×1024 @ 1024×1024 matmul, best of 5, in a child process per environment:", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(r) + " |" for r in probe_rows]
    lines += ["", verdict]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(path, "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
