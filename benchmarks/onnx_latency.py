"""onnxruntime (CPU) against the PyTorch path (``ibnorm.load``) on converted models: prefill and encode latency.

    python benchmarks/onnx_latency.py [--work /tmp/onnx_latency] [--models smollm2,minilm] [--seq-lens 128,512]
                                      [--batch 1] [--reps 7] [--reuse] [--tiny] [--out benchmarks/results/onnx_latency.md]

Per model: ``ibnorm convert … --lam 0.2`` (SmolLM2-135M: ``smollm2-135m``; MiniLM: ``minilm-l6``), ``ibnorm
export --format onnx`` (its wall time is reported), then for each sequence length the median of ``--reps``
calls of ``ibnorm.load(DIR)`` (float32, inference mode) and of an onnxruntime CPU session with as many
intra-op threads as torch uses, on the same random tokens (batch × sequence, no padding); the last column is
max |onnx − torch| / max |torch|.  SmolLM2 is prefill (logits of the whole sequence, no KV cache); MiniLM is
``last_hidden_state`` for torch vs the exported ``sentence_embedding`` (pooling and normalization included,
a few µs), so its row compares the encoders and its difference column compares pooled torch outputs.
``--tiny`` replaces SmolLM2 by a 2-layer random LLaMA (a smoke test of this script, not a measurement).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_and_save, time_ms  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SOURCES = {"smollm2": "smollm2-135m", "minilm": "minilm-l6"}


def _cli(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "ibnorm_cli", *args, "--json"], capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    return json.loads(proc.stdout) if proc.stdout.strip().startswith("{") else {}


def _tiny_llama(path: Path) -> str:
    import transformers as T

    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2, vocab_size=256))
    model.save_pretrained(path)
    return str(path)


def prepare(name: str, work: Path, reuse: bool, tiny: bool) -> tuple[Path, Path, float]:
    """(converted directory, ONNX file, export seconds)."""
    conv, onnx_file = work / name, work / f"{name}.onnx"
    if not (reuse and conv.is_dir()):
        source = _tiny_llama(work / "tiny_src") if tiny and name == "smollm2" else SOURCES[name]
        _cli("convert", source, "--lam", "0.2", "--out", str(conv), "--force")
    seconds = float("nan")
    if not (reuse and onnx_file.is_file()):
        seconds = _cli("export", str(conv), "--format", "onnx", "--out", str(onnx_file), "--force")["seconds"]
    return conv, onnx_file, seconds


def measure(name: str, conv: Path, onnx_file: Path, seq_lens: list[int], batch: int, reps: int, label: str) -> list[list[str]]:
    import onnxruntime as ort

    import ibnorm
    from ibnorm.deploy import relative_error

    model = ibnorm.load(conv).float().eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    vocab = model.config.vocab_size
    rows = []
    for seq in seq_lens:
        ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seq))
        mask = torch.ones_like(ids)
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        with torch.inference_mode():
            torch_ms = time_ms(lambda: model(input_ids=ids, attention_mask=mask), reps=reps)
            out = model(input_ids=ids, attention_mask=mask)
        ort_ms = time_ms(lambda: session.run(None, feeds), reps=reps)
        got = torch.from_numpy(session.run(None, feeds)[0])
        if name == "minilm":
            want = torch.nn.functional.normalize(out.last_hidden_state.mean(1), dim=-1)
            what = "encode"
        else:
            want, what = out.logits, "prefill"
        rows.append([label, what, f"{batch}×{seq}", f"{torch_ms:.1f}", f"{ort_ms:.1f}", f"{torch_ms / ort_ms:.2f}×",
                     f"{relative_error(got, want):.1e}"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/onnx_latency")
    ap.add_argument("--models", default="smollm2,minilm")
    ap.add_argument("--seq-lens", default="128,512")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--reuse", action="store_true", help="keep converted directories and ONNX files of an earlier run")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer random LLaMA instead of SmolLM2 (smoke test)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "onnx_latency.md"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    rows, exports = [], []
    for name in args.models.split(","):
        conv, onnx_file, seconds = prepare(name, work, args.reuse, args.tiny)
        exports.append(f"{name} {seconds:.0f} s" if seconds == seconds else f"{name} reused")
        rows += measure(name, conv, onnx_file, seq_lens, args.batch, args.reps, "tiny-llama" if args.tiny and name == "smollm2" else name)
    title = (f"onnxruntime vs ibnorm.load on CPU, float32, median of {args.reps} (ms); export: {', '.join(exports)}"
             + (" [--tiny: not a measurement]" if args.tiny else ""))
    print_and_save(args.out, title, ["model", "work", "batch×seq", "ibnorm.load ms", "onnxruntime ms", "speedup", "max rel diff"], rows,
                   width=120)


if __name__ == "__main__":
    main()
