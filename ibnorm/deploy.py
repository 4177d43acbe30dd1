"""Export a converted transformers model to ONNX (``ibnorm export DIR --format onnx --out FILE``).

What is exported is the shipped modeling code (``ibnorm/hf/modeling_ibnorm.py``), which under
``torch.export`` takes its exact, data-independent form, through ``torch.onnx.export(dynamo=True)``:

* causal LMs: ``input_ids``, ``attention_mask`` (int64, batch × sequence, both dynamic) → ``logits``
  (batch × sequence × vocabulary), float32.  There is no KV cache: every call recomputes the whole
  prefix (prefill and scoring; generation re-runs the sequence).
* sentence-transformers encoders: ``input_ids``, ``attention_mask`` → ``sentence_embedding``
  through the directory's own modules (pooling, normalization), equal to
  ``SentenceTransformer(DIR, trust_remote_code=True).encode``; truncate to its ``max_seq_length``
  when tokenizing, and ``token_type_ids`` are zero (single sentences).

The TorchScript exporter also works here and is 20× faster to export, but it bakes the Python
branches it passes (transformers' ``q_length == 1`` in attention) into the graph.  Before the file
appears, the ONNX model is checked (``onnx.checker``) and run with onnxruntime on the example
input against PyTorch; the file is written beside ``--out`` and renamed into place.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import IBNormError
from .validate import ExportPlan

# onnxruntime against PyTorch on the example input, relative to the largest output magnitude.
SELF_CHECK_TOLERANCE = 1e-4
OPSET = 18
_EXAMPLE_SHAPE = (2, 8)


class CausalLMLogits(nn.Module):
    """input_ids, attention_mask → logits, without a cache."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


class SentenceEmbedding(nn.Module):
    """input_ids, attention_mask → the sentence-transformers modules' ``sentence_embedding``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model({"input_ids": input_ids, "attention_mask": attention_mask})["sentence_embedding"]


def exportable(plan: ExportPlan) -> tuple[nn.Module, int, int]:
    """The module to export (float32, eval), its vocabulary size and its longest sequence."""
    if plan.kind == "causal-lm":
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(plan.directory, dtype=torch.float32).eval()
        wrapped: nn.Module = CausalLMLogits(model)
        config = model.config
    else:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(plan.directory), trust_remote_code=True, device="cpu").float().eval()
        wrapped, config = SentenceEmbedding(st), st[0].auto_model.config
        model = st[0].auto_model
    if type(model).__module__.rpartition(".")[2] != "modeling_ibnorm":
        raise IBNormError(f"{plan.directory} loaded as {type(model).__name__}, not through ibnorm's shipped code")
    max_len = getattr(config, "max_position_embeddings", None) or 2048
    return wrapped, int(config.vocab_size), int(max_len)


def _example(vocab: int, shape: tuple[int, int] = _EXAMPLE_SHAPE) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, shape, generator=g)
    mask = torch.ones_like(ids)
    mask[0, : shape[1] // 4] = 0  # a left-padded row
    return ids, mask


def _to_onnx(module: nn.Module, example: tuple, output_name: str, max_len: int):
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=max_len)
    dynamic = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return torch.onnx.export(module, example, dynamo=True, dynamic_shapes=dynamic, opset_version=OPSET,
                                 input_names=["input_ids", "attention_mask"], output_names=[output_name], verbose=False)


def run_onnx(path: str | Path, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The exported model's output on CPU (onnxruntime)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
    return torch.from_numpy(session.run(None, feeds)[0])


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| / max |want|."""
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30))


def export_onnx(plan: ExportPlan, progress: Callable[[str, int, int], None] = lambda *_: None) -> dict[str, Any]:
    """Write the ONNX file of a checked plan (``validate.check_export``); returns what was written."""
    import onnx

    start = time.time()
    progress("load", 0, 3)
    module, vocab, max_len = exportable(plan)
    output_name = "logits" if plan.kind == "causal-lm" else "sentence_embedding"
    example = _example(vocab)
    progress("export", 1, 3)
    program = _to_onnx(module, example, output_name, max_len)
    tmp = plan.out.with_name(f".{plan.out.name}.tmp-{os.getpid()}")
    try:
        program.model.metadata_props.update({"ibnorm.kind": plan.kind, "ibnorm.kv_cache": "none"})
        program.save(str(tmp), external_data=False)
        progress("check", 2, 3)
        try:
            onnx.checker.check_model(str(tmp))
        except Exception as e:  # noqa: BLE001  onnx's ValidationError, or a protobuf error
            raise IBNormError(f"the exported ONNX model is invalid ({str(e).strip().splitlines()[0][:200]}); nothing written") from None
        with torch.no_grad():
            want = module(*example)
        got = run_onnx(tmp, *example)
        if plan.kind == "causal-lm":  # padded positions attend to nothing: their logits are arbitrary
            got, want = got[example[1].bool()], want[example[1].bool()]
        error = relative_error(got, want)
        if not error <= SELF_CHECK_TOLERANCE:
            raise IBNormError(f"the ONNX model differs from PyTorch by {error:.2e} (relative) on the example input; nothing written")
        os.replace(tmp, plan.out)
    finally:
        tmp.unlink(missing_ok=True)
    progress("check", 3, 3)
    return {"directory": str(plan.directory), "format": "onnx", "out": str(plan.out), "kind": plan.kind,
            "inputs": ["input_ids", "attention_mask"], "output": output_name, "dynamic": ["batch", "sequence"],
            "kv_cache": False, "opset": OPSET, "exporter": "torch.onnx.export(dynamo=True)",
            "bytes": plan.out.stat().st_size, "self_check_relative_error": error, "seconds": round(time.time() - start, 1)}
