"""Model families: what differs between a causal LM, an encoder and an image classifier, declared once.

Each family knows its calibration inputs, how to run a batch, what output the end-to-end check
compares and how, its block layout, and how its weights and config are saved.  Everything else
in the pipeline is the same for all of them.  New families register with :func:`register_family`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import image_folder, is_image_folder, load_images, param_dtype, read_texts, timm_eval_transform, token_examples
from ..errors import IBNormError
from ..validate import parse_size
from .layout import Blocks, find_blocks


@dataclass(frozen=True)
class ModelFamily:
    """Base: a family is identified by its library and task (as the manifest records them)."""

    library: str  # "hf" (transformers) | "timm"
    task: str  # "causal-lm" | "encoder" | "image-classifier"
    drift_metric: str

    # --- data ---------------------------------------------------------------------------------
    def calibration_inputs(self, data: str, tokenizer, samples: int, seq_len: int, text_field: str, model: nn.Module) -> Tensor:
        if tokenizer is None:
            raise IBNormError("this model has no tokenizer: text calibration is not possible")
        if is_image_folder(data):
            raise IBNormError(f"{data} is an image folder, but this model reads text")
        return token_examples(tokenizer, read_texts(data, text_field), seq_len, samples)

    # --- running ------------------------------------------------------------------------------
    def run(self, model: nn.Module, batch: Tensor) -> Any:
        return model(input_ids=batch, use_cache=False)

    def outputs(self, model: nn.Module, batch: Tensor) -> Tensor:
        """What the end-to-end check compares, for one batch."""
        raise NotImplementedError

    def drift(self, reference: list[Tensor], outputs: list[Tensor]) -> float:
        raise NotImplementedError

    def layout(self, model: nn.Module) -> Blocks | None:
        """The repeated blocks, or None: the whole model is then calibrated as one block."""
        return find_blocks(model)

    # --- saving -------------------------------------------------------------------------------
    def save_weights(self, model: nn.Module, directory: Path, shard_size: str) -> None:
        # transformers reads only SI units; every size ibnorm accepts (2GiB too) is passed as bytes
        model.save_pretrained(directory, safe_serialization=True, max_shard_size=parse_size(shard_size))

    def base_config(self, model: nn.Module, directory: Path, source: dict) -> dict:
        """The source's config.json content (read back from what ``save_weights`` wrote)."""
        return json.loads((directory / "config.json").read_text())


@dataclass(frozen=True)
class CausalLM(ModelFamily):
    library: str = "hf"
    task: str = "causal-lm"
    drift_metric: str = "KL nats/token"

    @torch.no_grad()
    def outputs(self, model: nn.Module, batch: Tensor) -> Tensor:
        return F.log_softmax(self.run(model, batch).logits.float(), -1)

    def drift(self, reference: list[Tensor], outputs: list[Tensor]) -> float:
        total, count = 0.0, 0
        for logp, logq in zip(reference, outputs):
            diff = logp - logq  # in place below: two temporaries of the logits' size, not three
            total += float(diff.mul_(logp.exp()).sum())
            count += logp.shape[0] * logp.shape[1]
        return total / max(count, 1)


@dataclass(frozen=True)
class Encoder(ModelFamily):
    library: str = "hf"
    task: str = "encoder"
    drift_metric: str = "1 - cosine"

    def run(self, model: nn.Module, batch: Tensor) -> Any:
        return model(input_ids=batch)

    @torch.no_grad()
    def outputs(self, model: nn.Module, batch: Tensor) -> Tensor:
        return self.run(model, batch).last_hidden_state.float().mean(1)  # mean-pooled embeddings

    def drift(self, reference: list[Tensor], outputs: list[Tensor]) -> float:
        cos = F.cosine_similarity(torch.cat(reference), torch.cat(outputs), dim=-1)
        return 1.0 - float(cos.mean())


@dataclass(frozen=True)
class ImageClassifier(ModelFamily):
    library: str = "timm"
    task: str = "image-classifier"
    drift_metric: str = "KL nats/image"

    def calibration_inputs(self, data: str, tokenizer, samples: int, seq_len: int, text_field: str, model: nn.Module) -> Tensor:
        if not is_image_folder(data):
            raise IBNormError(f"{data} is not an image folder (root/CLASS/image files), and an image model needs images")
        images, _ = load_images(image_folder(data), timm_eval_transform(model), samples)
        return images.to(param_dtype(model))

    def run(self, model: nn.Module, batch: Tensor) -> Tensor:
        return model(batch)

    @torch.no_grad()
    def outputs(self, model: nn.Module, batch: Tensor) -> Tensor:
        return model(batch).float()

    def drift(self, reference: list[Tensor], outputs: list[Tensor]) -> float:
        logp, logq = F.log_softmax(torch.cat(reference), -1), F.log_softmax(torch.cat(outputs), -1)
        return float((logp.exp() * (logp - logq)).sum(-1).mean())

    def layout(self, model: nn.Module) -> Blocks | None:
        return None  # CNN stages differ in shape: the whole model is one block

    def save_weights(self, model: nn.Module, directory: Path, shard_size: str) -> None:
        from safetensors.torch import save_model

        save_model(model, str(directory / "model.safetensors"))

    def base_config(self, model: nn.Module, directory: Path, source: dict) -> dict:
        return {"architecture": source["architecture"], "library": "timm", "num_classes": getattr(model, "num_classes", None)}


_FAMILIES: dict[tuple[str, str], ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    _FAMILIES[(family.library, family.task)] = family
    return family


for _f in (CausalLM(), Encoder(), ImageClassifier()):
    register_family(_f)


def family_of(library: str, task: str) -> ModelFamily:
    try:
        return _FAMILIES[(library, task)]
    except KeyError:
        raise IBNormError(f"no model family for {library} {task} models") from None
