"""Streaming conversion of a random-weight LLaMA-7B-shaped checkpoint: wall time and peak memory.

    python benchmarks/bench_stream_7b.py [--dir /tmp/llama7b-random] [--calib-samples 8] [--seq-len 256] [--skip-calibrated]

Generates (once) a checkpoint with the real Llama-2-7B config in bf16, sharded safetensors (2 GB shards),
with a small BPE tokenizer trained on builtin text (ids < 32000). Then, each as a child process whose
peak resident memory is read from the OS: the baseline (a plain transformers load + save_pretrained of
the same checkpoint), `ibnorm convert --stream always` without calibration (--lam) and with
calibration; `ibnorm inspect` of the result; `ibnorm.load` of the result.  With calibration it also times
one forward of the source (transformers, bf16) over the same calibration tokens in convert's batches, so
the calibration cost reads in forward passes: (calibrated − fixed-λ convert) ÷ that forward.
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


def generate(directory: Path) -> None:
    import transformers
    from accelerate import init_empty_weights
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from ibnorm.data import read_texts
    from ibnorm.io.stream_writer import DTYPE_NAMES, PlannedTensor, ShardedWriter

    directory.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(**LLAMA2_7B, dtype="bfloat16")
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


# Each command runs under a fresh wrapper process whose RUSAGE_CHILDREN is that command's alone
# (the benchmark's own RUSAGE_CHILDREN is a running maximum over every child).
_WRAP = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
         "sys.stderr.write(f'\\nPEAK_KIB {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}\\n'); sys.exit(r.returncode)")


def run(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds and peak RSS (GiB) of a child process."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _WRAP, *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    peak = int(p.stderr.rsplit("PEAK_KIB", 1)[1].split()[0])
    return wall, peak / 2**20, p.stdout


BASELINE = ("import sys, transformers; m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype='auto'); "
            "m.save_pretrained(sys.argv[2], max_shard_size='5GB')")


def calibration_cost(src: Path, args, walls: list[float]) -> list[list[str]]:
    """One forward of the source over the calibration tokens, and the calibration cost in such passes."""
    script = [sys.executable, "-c", FORWARD_SCRIPT, str(src), "builtin:pydoc:train", str(args.calib_samples),
              str(args.seq_len), "4", "1"]
    wall, peak, stdout = run(script)
    fwd = json.loads(stdout.strip().splitlines()[-1])
    extra = walls[1] - walls[0]
    return [[f"one forward of the source over the {fwd['tokens']} calibration tokens (bf16, batches of 4)",
             f"{fwd['forward_s']:.0f}", f"{peak:.2f}", f"load {fwd['load_s']:.0f} s, not counted"],
            ["**calibration cost** (calibrated − fixed-λ convert)", f"{extra:.0f}", "-",
             f"**{extra / fwd['forward_s']:.2f} forward passes** (target ≤ 3)"]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/llama7b-random")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--skip-calibrated", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/stream_7b.md")
    args = ap.parse_args()
    src = Path(args.dir)
    rows = []
    if not (src / "config.json").exists():
        t = time.perf_counter()
        generate(src)
        rows.append(["generate random 7B checkpoint (bf16)", f"{time.perf_counter() - t:.0f}", "-", ""])
    size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    cli = [sys.executable, "-m", "ibnorm_cli"]
    base_out = Path(f"{src}-resaved")
    shutil.rmtree(base_out, ignore_errors=True)
    base_wall, peak, _ = run([sys.executable, "-c", BASELINE, str(src), str(base_out)])
    shutil.rmtree(base_out, ignore_errors=True)
    rows.append(["baseline: transformers from_pretrained + save_pretrained (same checkpoint)", f"{base_wall:.0f}", f"{peak:.2f}", "1.00×"])
    runs = [("convert --lam 0.1 (no calibration, streamed)", ["--lam", "0.1"])]
    if not args.skip_calibrated:
        runs.append((f"convert --calib builtin:pydoc:train ({args.calib_samples} × {args.seq_len} tokens, streamed)",
                     ["--calib", "builtin:pydoc:train", "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len)]))
    walls: list[float] = []
    # Order matters for ru_maxrss of children (a running maximum): the smaller run goes first.
    for label, extra in runs:
        out = Path(f"{src}-ib")
        shutil.rmtree(out, ignore_errors=True)
        wall, peak, _ = run(cli + ["convert", str(src), "--out", str(out), "--stream", "always", "--json", *extra])
        walls.append(wall)
        rows.append([label, f"{wall:.0f}", f"{peak:.2f}", f"{size / 1e9:.1f} GB in; {wall / base_wall:.2f}× the baseline"])
        wall, peak_i, stdout = run(cli + ["inspect", str(out), "--json"])
        info = json.loads(stdout)
        rows.append([f"  inspect the result ({info['files']} shards, {info['tensors']} tensors)", f"{wall:.2f}", "-",
                     "λ mean {:.3f}".format(info["lambda"]["mean"])])
    if not args.skip_calibrated:
        rows += calibration_cost(src, args, walls)
    code = ("import ibnorm, torch, sys; m = ibnorm.load(sys.argv[1]); "
            "print(m(input_ids=torch.tensor([[1, 2, 3, 4]])).logits.shape)")
    wall, peak, stdout = run([sys.executable, "-c", code, f"{src}-ib"])
    rows.append(["ibnorm.load of the result + 4-token forward", f"{wall:.0f}", f"{peak:.2f}", stdout.strip()])
    columns = ["step", "wall s", "peak RSS GiB", "note"]
    title = "Streaming conversion of a random-weight LLaMA-7B-shaped checkpoint (bf16, 2 GB shards)"
    print_and_save(args.out, title, columns, rows)


if __name__ == "__main__":
    main()
