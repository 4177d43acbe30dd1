"""SmolLM2-135M converted, then read by standard clients: how far each is from ``ibnorm.load``.

    python benchmarks/hf_export_smollm2.py [--work /tmp/hfx] [--blocks 4] [--seq-len 256] [--docs 6] [--calibrated]

Converts with ``--lam 0.2`` (and, with ``--calibrated``, ``--calib builtin:pydoc:train``) into format 1,
upgrades a copy with
``ibnorm upgrade``, and compares on held-out text (builtin:pydoc:eval):
  * ibnorm.load (reference), transformers without remote code with ibnorm imported (registered),
    transformers with trust_remote_code in a process where ibnorm cannot be imported (shipped code),
    stock transformers on the format-1 directory (the misread this format removes);
  * greedy generate() of the shipped code vs ibnorm.load;
  * lm-eval (loglikelihood_rolling over a local jsonl, shipped code) vs the same perplexities
    computed from ibnorm.load.
Writes benchmarks/results/hf_export_smollm2.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def _env(work: Path, with_ibnorm: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if with_ibnorm:
        env["PYTHONPATH"] = str(REPO)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_MODULES_CACHE=str(work / "hf_modules"), HF_DATASETS_CACHE=str(work / "datasets"))
    return env


def _run(args: list[str], work: Path, with_ibnorm: bool) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=work, env=_env(work, with_ibnorm), stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    return time.perf_counter() - t0


def _ppl(logits: torch.Tensor, ids: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].double().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return float(nll.exp())


def _doc_perplexities(model, tok, texts: list[str]) -> dict:
    """lm-eval's rolling log-likelihood (prefix BOS, else EOS; no special tokens) per word and per byte."""
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    total = 0.0
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([[prefix] + ids[:-1]])).logits.double(), -1)
        total += logp[0, torch.arange(len(ids)), torch.tensor(ids)].sum().item()
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"word_perplexity": float(torch.tensor(-total / words).exp()), "byte_perplexity": float(torch.tensor(-total / nbytes).exp())}


def _lm_eval(work: Path, v2: Path, texts: list[str]) -> tuple[dict, float]:
    task = work / "task"
    task.mkdir(exist_ok=True)
    with open(task / "docs.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    (task / "ibnorm_ppl.yaml").write_text(
        "task: ibnorm_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {task / 'docs.jsonl'}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n')
    code = "import sys; sys.modules['ibnorm'] = None\nfrom lm_eval.__main__ import cli_evaluate\nsys.argv = ['lm_eval'] + sys.argv[1:]\ncli_evaluate()\n"
    seconds = _run([sys.executable, "-c", code, "--model", "hf", "--model_args", f"pretrained={v2},trust_remote_code=True",
                    "--tasks", "ibnorm_ppl", "--include_path", str(task), "--device", "cpu", "--batch_size", "1",
                    "--output_path", str(work / "lm_eval_out")], work, with_ibnorm=False)
    result = json.loads(max((work / "lm_eval_out").rglob("results_*.json")).read_text())["results"]["ibnorm_ppl"]
    return {k.split(",")[0]: v for k, v in result.items() if k.endswith(",none")}, seconds


def measure(work: Path, convert_args: list[str], blocks: int, seq_len: int, n_docs: int) -> list[str]:
    """Convert, upgrade a copy, run every client; the markdown lines of one conversion."""
    import transformers

    import ibnorm
    from ibnorm.data import read_texts, token_examples
    from safetensors.torch import load_file

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    v1, v2 = work / "v1", work / "v2"
    t_convert = _run([sys.executable, "-m", "ibnorm_cli", "convert", "smollm2-135m", *convert_args, "--out", str(v1)], work, True)
    shutil.copytree(v1, v2)
    t_upgrade = _run([sys.executable, "-m", "ibnorm_cli", "upgrade", str(v2)], work, True)
    old = v1  # what stock transformers misreads: a base config.json beside IBNorm weights
    config = json.loads((v1 / "config.json").read_text())
    if config["model_type"].startswith("ibnorm_"):  # convert already wrote the new format: make a format-1 config
        from ibnorm.hf import base_config_dict

        old = work / "format1"
        shutil.copytree(v1, old)
        (old / "config.json").write_text(json.dumps(base_config_dict(config)))

    tok = transformers.AutoTokenizer.from_pretrained(v1)
    texts = read_texts("builtin:pydoc:eval")
    ids = token_examples(tok, texts, seq_len, blocks)
    reference = ibnorm.load(v1)
    with torch.no_grad():
        ref = reference(ids).logits
        registered = transformers.AutoModelForCausalLM.from_pretrained(v2).eval()(ids).logits
        stock_v1 = transformers.AutoModelForCausalLM.from_pretrained(old).eval()(ids).logits
    prompt = "The Python language reference"
    job = {"out": str(work), "families": {"smollm2": {"dir": str(v2), "auto": "AutoModelForCausalLM", "ids": ids.tolist()}},
           "lm": {"dir": str(v2), "prompt": prompt}}
    (work / "job.json").write_text(json.dumps(job))
    _run([sys.executable, str(REPO / "tests" / "hf_clients.py"), str(work / "job.json")], work, with_ibnorm=False)
    remote_results = json.loads((work / "results.json").read_text())
    remote = load_file(work / "tensors.safetensors")["smollm2"]
    prompt_ids = tok(prompt, return_tensors="pt").input_ids
    expected_gen = reference.generate(prompt_ids, max_new_tokens=8, do_sample=False).tolist()
    docs = [t[:2000] for t in texts[:n_docs]]
    lm_eval_scores, t_lm_eval = _lm_eval(work, v2, docs)
    own = _doc_perplexities(reference, tok, docs)

    rows = [("ibnorm.load (its CPU path)", ref), ("transformers, ibnorm imported, no remote code", registered),
            ("transformers, trust_remote_code, ibnorm not importable", remote),
            ("stock transformers on the format-1 directory (the misread)", stock_v1)]
    p_ref = _ppl(ref, ids)
    lines = [f"## `ibnorm convert smollm2-135m {' '.join(convert_args)}`", "",
             f"convert {t_convert:.0f} s, `ibnorm upgrade` {t_upgrade:.0f} s (CLI subprocesses, imports included); "
             f"held-out text builtin:pydoc:eval, {blocks} × {seq_len} tokens", "",
             "| client | max \\|Δlogit\\| vs ibnorm.load | perplexity | Δ perplexity |", "|---|---|---|---|"]
    for name, logits in rows:
        lines.append(f"| {name} | {(logits - ref).abs().max().item():.3g} | {_ppl(logits, ids):.6g} | {_ppl(logits, ids) - p_ref:+.3g} |")
    lines += ["", f"- greedy `generate()` (8 new tokens), shipped code vs ibnorm.load: "
              f"{'identical' if remote_results['generate'] == expected_gen else 'DIFFERENT'}; "
              f"`pipeline('text-generation')` built {remote_results['pipeline_class']}",
              f"- stock `from_pretrained` of the new directory without remote code: `{remote_results['smollm2.stock'][:110]}…`",
              f"- lm-eval (`--model hf --model_args pretrained=DIR,trust_remote_code=True`, loglikelihood_rolling over "
              f"{len(docs)} local docs, {t_lm_eval:.0f} s) vs the same quantity from ibnorm.load:", "",
              "| metric | lm-eval (shipped code) | ibnorm.load | relative difference |", "|---|---|---|---|"]
    for metric, value in own.items():
        lines.append(f"| {metric} | {lm_eval_scores[metric]:.8g} | {value:.8g} | {lm_eval_scores[metric] / value - 1:+.1e} |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/hfx")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--docs", type=int, default=6)
    ap.add_argument("--calibrated", action="store_true", help="also measure a calibrated conversion (--calib builtin:pydoc:train)")
    args = ap.parse_args()
    import transformers

    lines = ["# SmolLM2-135M converted, read by standard clients vs `ibnorm.load`", "",
             f"command: `python benchmarks/hf_export_smollm2.py --blocks {args.blocks} --seq-len {args.seq_len} --docs {args.docs}"
             f"{' --calibrated' if args.calibrated else ''}`", "",
             f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, transformers {transformers.__version__}, "
             "float32 on CPU. \"shipped code\" runs in a process where `import ibnorm` fails.", ""]
    variants = [["--lam", "0.2"]] + ([["--calib", "builtin:pydoc:train"]] if args.calibrated else [])
    out = REPO / "benchmarks" / "results" / "hf_export_smollm2.md"
    for i, convert_args in enumerate(variants):
        lines += measure(Path(args.work) / str(i), convert_args, args.blocks, args.seq_len, args.docs)
        out.write_text("\n".join(lines))  # after each conversion: a long run keeps what it measured
    print("\n".join(lines))


if __name__ == "__main__":
    main()
