"""Standard clients on converted directories, run where ibnorm cannot be imported.

``python hf_clients.py JOB.json`` (from tests/test_hf_export.py, in a subprocess with PYTHONPATH
unset and another working directory).  Everything comes from the directories' shipped code through
``trust_remote_code=True``.  Tensors are written as safetensors, the rest as JSON.
"""

from __future__ import annotations

import json
import sys

sys.modules["ibnorm"] = None  # any `import ibnorm` now raises ImportError

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def families(job: dict, tensors: dict, results: dict) -> None:
    for name, f in job.get("families", {}).items():
        auto = getattr(transformers, f["auto"])
        try:  # stock transformers, no remote code: must refuse, not build the base model
            auto.from_pretrained(f["dir"])
            results[f"{name}.stock"] = "loaded"
        except Exception as e:
            results[f"{name}.stock"] = f"{type(e).__name__}: {e}"
        config = transformers.AutoConfig.from_pretrained(f["dir"], trust_remote_code=True)
        model = auto.from_pretrained(f["dir"], trust_remote_code=True).eval()
        results[f"{name}.classes"] = [type(config).__name__, type(model).__name__, type(model).__module__]
        with torch.no_grad():
            out = model(torch.tensor(f["ids"]))
        tensors[name] = (out.logits if hasattr(out, "logits") else out.last_hidden_state).contiguous()


def text_generation(job: dict, tensors: dict, results: dict) -> None:
    lm = job.get("lm")
    if not lm:
        return
    tok = transformers.AutoTokenizer.from_pretrained(lm["dir"], trust_remote_code=True)
    pipe = transformers.pipeline("text-generation", model=lm["dir"], trust_remote_code=True, device="cpu")
    results["pipeline"] = pipe(lm["prompt"], max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    model = transformers.AutoModelForCausalLM.from_pretrained(lm["dir"], trust_remote_code=True).eval()
    ids = tok(lm["prompt"], return_tensors="pt").input_ids
    results["generate"] = model.generate(ids, max_new_tokens=8, do_sample=False).tolist()
    results["pipeline_class"] = type(pipe.model).__name__


def sentence_transformers(job: dict, tensors: dict, results: dict) -> None:
    st = job.get("minilm")
    if not st:
        return
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(st["dir"], trust_remote_code=True, device="cpu")
    tensors["minilm"] = model.encode(st["texts"], convert_to_tensor=True).contiguous()


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    tensors: dict = {}
    results: dict = {}
    try:
        import ibnorm  # noqa: F401

        results["ibnorm_importable"] = True
    except ImportError:
        results["ibnorm_importable"] = False
    families(job, tensors, results)
    text_generation(job, tensors, results)
    sentence_transformers(job, tensors, results)
    save_file(tensors, f"{job['out']}/tensors.safetensors")
    with open(f"{job['out']}/results.json", "w") as fh:
        json.dump(results, fh)


if __name__ == "__main__":
    main()
