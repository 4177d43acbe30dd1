"""Fine-tuning data: packed token examples (next-token prediction) or labelled images."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..data import check_images, image_folder, is_image_folder, load_images, read_texts, timm_eval_transform, token_examples
from ..errors import IBNormError
from ..io.sources import LoadedModel
from .options import FinetuneOptions


@dataclass
class Examples:
    """Token examples (labels None: next-token prediction) or images with class labels."""

    inputs: Tensor
    labels: Tensor | None = None

    def __len__(self) -> int:
        return len(self.inputs)

    def take(self, idx) -> "Examples":
        return Examples(self.inputs[idx], None if self.labels is None else self.labels[idx])

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.inputs.contiguous().numpy().tobytes())
        if self.labels is not None:
            h.update(self.labels.numpy().tobytes())
        return h.hexdigest()[:16]


@dataclass
class RawData:
    """The training and held-out data as read from disk, before any model is loaded."""

    images: bool
    train: object  # texts, or an ImageFolder
    held_out: object | None


def read_data(opts: FinetuneOptions) -> RawData:
    """Read (and so validate) the data before any model work."""
    if is_image_folder(opts.data):
        folders = (image_folder(opts.data), image_folder(opts.eval_data) if opts.eval_data else None)
        for folder in folders:
            if folder is not None:
                check_images(folder)
        return RawData(True, *folders)
    return RawData(False, read_texts(opts.data, opts.text_field),
                   read_texts(opts.eval_data, opts.text_field) if opts.eval_data else None)


def build_examples(raw: RawData, loaded: LoadedModel, opts: FinetuneOptions, path: str) -> tuple[Examples, Examples]:
    """(train, held-out) examples for the model; held-out defaults to the last 10% of the data."""
    if raw.images:
        if loaded.task != "image-classifier":
            raise IBNormError(f"{opts.data} is an image folder, but {path} is not an image classifier")
        return _image_examples(loaded.model, raw, opts)
    if loaded.library != "hf" or loaded.task != "causal-lm":
        raise IBNormError(f"{path}: text fine-tuning needs a causal language model (an `ibnorm convert` output, or its source)")
    if loaded.tokenizer is None:
        raise IBNormError(f"{path} has no tokenizer files")
    train = Examples(token_examples(loaded.tokenizer, raw.train, opts.seq_len))
    if raw.held_out is not None:
        return train, Examples(token_examples(loaded.tokenizer, raw.held_out, opts.seq_len, opts.eval_blocks))
    n_eval = max(1, len(train) // 10)
    if len(train) - n_eval < 1:
        raise IBNormError("not enough training data for a held-out split: pass --eval-data")
    held_out = train.take(slice(-n_eval, len(train))).take(slice(0, opts.eval_blocks))
    return train.take(slice(0, -n_eval)), held_out


def _image_examples(model: nn.Module, raw: RawData, opts: FinetuneOptions) -> tuple[Examples, Examples]:
    """Images with timm's evaluation transform (deterministic); a seeded 10% split when no --eval-data."""
    transform = timm_eval_transform(model)
    x, y = load_images(raw.train, transform)
    train = Examples(x, y)
    if raw.held_out is not None:
        ex, ey = load_images(raw.held_out, transform)
        return train, Examples(ex, ey)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(opts.seed))
    n_eval = max(1, len(x) // 10)
    if len(x) - n_eval < 1:
        raise IBNormError("not enough images for a held-out split: pass --eval-data")
    return train.take(perm[n_eval:]), train.take(perm[:n_eval])


def loss_of(model: nn.Module, x: Tensor, y: Tensor | None) -> Tensor:
    if y is None:
        return model(input_ids=x, labels=x).loss
    return nn.functional.cross_entropy(model(x).float(), y)


@torch.no_grad()
def evaluate_loss(model: nn.Module, data: Examples, batch_size: int, device) -> dict:
    """Held-out loss and perplexity (tokens) or accuracy (images)."""
    was_training = model.training
    model.eval()
    total, count, correct = 0.0, 0, 0
    for i in range(0, len(data), batch_size):
        x = data.inputs[i : i + batch_size].to(device)
        if data.labels is None:
            n = x.numel() - x.shape[0]  # predicted tokens
            total += float(loss_of(model, x, None)) * n
        else:
            y = data.labels[i : i + batch_size].to(device)
            logits = model(x).float()
            n = len(y)
            total += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
        count += n
    model.train(was_training)
    nll = total / max(count, 1)
    if not math.isfinite(nll):
        raise IBNormError(f"held-out loss is {nll}: the model produces non-finite outputs")
    if data.labels is None:
        return {"loss": nll, "perplexity": math.exp(nll), "tokens": count}
    return {"loss": nll, "accuracy": correct / max(count, 1), "images": count}


def default_data(path: str) -> tuple[str, str]:
    """Training data when none is named: the calibration data the manifest records, else built-in text."""
    from pathlib import Path

    from ..io.manifest import MANIFEST, read_manifest

    p = Path(path)
    if (p / MANIFEST).is_file():
        recorded = (read_manifest(p).get("calibration") or {}).get("data")
        if recorded and (recorded.startswith("builtin:") or Path(recorded).exists()):
            return recorded, "the calibration data recorded in its manifest"
    return "builtin:pydoc:train", "built-in English text (the Python reference manual)"
