"""CPU inference speed: prefill and greedy-decode tokens/s of a source model and its conversion.

    python benchmarks/cpu_inference.py [--source smollm2-135m] [--converted DIR] [--dtypes float32 bfloat16]
        [--repeats 5] [--paths auto reference] [--out benchmarks/results/cpu_inference.md]

Without ``--converted`` the source is converted in memory with data calibration (``--calib-samples`` ×
``--calib-len`` tokens of builtin:pydoc:train), which gives a realistic λ pattern (most channels
compressed, some at λ = 0).  Prefill: one forward over ``--batch`` × ``--prefill-len`` tokens.  Decode:
``model.generate`` (greedy, KV cache) of ``--new-tokens`` tokens after a ``--prompt-len`` prompt, timed as
a whole and divided by the new tokens.  Each repeat runs every model once, in turn, so drift on a
shared machine hits all columns alike; the table gives min / median / max over ``--repeats`` and the
ratio of the *best* times (converted ÷ source; > 1 is slower).  ``--paths`` also times the converted
model with ``IBNORM_KERNEL=reference`` (the eager reference: the "before").
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(__file__))
import ibnorm  # noqa: E402
from _common import print_and_save  # noqa: E402
from ibnorm.data import read_texts, token_examples  # noqa: E402
from ibnorm.io.sources import load_source  # noqa: E402


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="smollm2-135m")
    ap.add_argument("--converted", help="a directory written by `ibnorm convert` (default: convert in memory)")
    ap.add_argument("--calib-samples", type=int, default=8)
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--paths", nargs="+", default=["auto"], help="IBNORM_KERNEL values for the converted model")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shipped", action="store_true",
                    help="also time the converted directory read by transformers (the shipped modeling code that "
                         "trust_remote_code runs); needs --converted")
    ap.add_argument("--out", default="benchmarks/results/cpu_inference.md")
    return ap.parse_args()


def _models(args: argparse.Namespace):
    t = time.perf_counter()
    loaded = load_source(args.source)
    load_s = time.perf_counter() - t
    source = loaded.model.eval()
    if args.converted:
        converted, how = ibnorm.load(args.converted).eval(), f"loaded from {args.converted}"
    else:
        conv = copy.copy(loaded)
        conv.model = copy.deepcopy(source)
        opts = ibnorm.ConvertOptions(calib="builtin:pydoc:train", calib_samples=args.calib_samples, seq_len=args.calib_len)
        ibnorm.convert_model(conv, opts)
        converted, how = conv.model.eval(), f"converted in memory (calibrated on {args.calib_samples}×{args.calib_len} tokens)"
    lam = torch.cat([m.effective_lam.reshape(-1) for m in converted.modules() if isinstance(m, ibnorm.IBNormBase)])
    how += f"; λ mean {lam.mean():.3f}, {100 * (lam == 0).float().mean():.1f}% of channels at λ = 0"
    shipped = None
    if args.shipped:
        import transformers

        # With ibnorm imported the registered classes are the shipped modeling code (what trust_remote_code runs).
        shipped = transformers.AutoModelForCausalLM.from_pretrained(args.converted).eval()
    return loaded.tokenizer, source, converted, shipped, how, load_s


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _runners(model: torch.nn.Module, prefill_ids: torch.Tensor, prompt: torch.Tensor, new: int, pad_id: int | None):
    def prefill() -> None:
        with torch.inference_mode():
            model(input_ids=prefill_ids, use_cache=False)

    def decode() -> None:
        with torch.inference_mode():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=pad_id)

    return {"prefill": prefill, "decode": decode}


def _env_run(path: str | None, fn: Callable[[], object]) -> float:
    old = os.environ.get("IBNORM_KERNEL")
    if path is not None:
        os.environ["IBNORM_KERNEL"] = path
    try:
        return _timed(fn)
    finally:
        if old is None:
            os.environ.pop("IBNORM_KERNEL", None)
        else:
            os.environ["IBNORM_KERNEL"] = old


def _fmt(samples: list[float], tokens: int) -> str:
    tps = sorted(tokens / s for s in samples)
    return f"{tps[-1]:.1f} / {statistics.median(tps):.1f} / {tps[0]:.1f}"


def main() -> None:
    args = _parse()
    torch.manual_seed(0)
    if args.shipped and not args.converted:
        sys.exit("error: --shipped needs --converted DIR (a directory written by `ibnorm convert`)")
    tok, source, converted, shipped, how, load_s = _models(args)
    ids = token_examples(tok, read_texts("builtin:pydoc:eval"), args.prefill_len, args.batch)
    prompt = ids[:1, : args.prompt_len]
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        src, conv = source.to(dtype), converted.to(dtype)
        entries = [("source", src, None)] + [(f"converted ({p})", conv, p) for p in args.paths]
        if shipped is not None:
            entries.append(("converted (shipped code)", shipped.to(dtype), None))
        runs = {name: _runners(m, ids, prompt, args.new_tokens, tok.eos_token_id) for name, m, _ in entries}
        times: dict[tuple[str, str], list[float]] = {(n, k): [] for n, _, _ in entries for k in ("prefill", "decode")}
        for name, _, path in entries:  # warm-up (first-call allocations, lazy inits)
            for k in ("prefill", "decode"):
                _env_run(path, runs[name][k])
        for i in range(args.repeats):
            for k in ("prefill", "decode"):
                # The order rotates between repeats: whichever model runs right after a heavy run (a
                # warmer, possibly down-clocked CPU) would otherwise always be the same one.
                for name, _, path in entries[i % len(entries):] + entries[: i % len(entries)]:
                    times[(name, k)].append(_env_run(path, runs[name][k]))
        for k, tokens in (("prefill", ids.numel()), ("decode", args.new_tokens)):
            best_src = min(times[("source", k)])
            for name, _, _ in entries:
                ratio = min(times[(name, k)]) / best_src
                # Each repeat runs every model back to back, so the ratio within a repeat cancels slow drift.
                paired = sorted(t / s for t, s in zip(times[(name, k)], times[("source", k)]))
                rows.append([dtype_name, k, name, _fmt(times[(name, k)], tokens), f"{min(times[(name, k)]):.3f}",
                             f"{ratio:.3f}×", f"{statistics.median(paired):.3f}× ({paired[0]:.3f}–{paired[-1]:.3f})"])
            print(rows[-len(entries):], flush=True)
    title = (f"{args.source} on CPU: prefill {args.batch}×{args.prefill_len} tokens, greedy decode {args.new_tokens} tokens "
             f"after {args.prompt_len}; best of {args.repeats} (source load {load_s:.1f} s); converted: {how}")
    columns = ["dtype", "phase", "model", "tokens/s best / median / worst", "best s", "time ÷ source (best)",
               "time ÷ source, paired: median (min–max)"]
    print_and_save(args.out, title, columns, rows)


if __name__ == "__main__":
    main()
