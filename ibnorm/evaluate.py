"""Model-level measurements: perplexity, next-token KL, embedding agreement, top-1 accuracy."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import image_folder, load_images, param_dtype, read_texts, timm_eval_transform, token_examples
from .errors import OptionError
from .validate import check_finite, seq_len_for


def _batches(n: int, batch_size: int):
    for i in range(0, n, batch_size):
        yield slice(i, min(n, i + batch_size))


@torch.no_grad()
def perplexity(
    model: nn.Module, ids: Tensor, window: int = 512, stride: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Sliding-window perplexity of one long token sequence.

    Windows of ``window`` tokens advance by ``stride`` (default window/2); each token is
    scored once, with at least ``window − stride`` tokens of context (except the first window).
    """
    ids = ids.reshape(-1).to(next(model.parameters()).device)
    stride = stride or window // 2
    nll, counted, prev_end = 0.0, 0, 0
    starts = list(range(0, max(1, len(ids) - 1), stride))
    for i, begin in enumerate(starts):
        end = min(begin + window, len(ids))
        chunk = ids[begin:end][None]
        logits = model(input_ids=chunk).logits.float()[0, :-1]
        targets = chunk[0, 1:]
        new_from = max(prev_end - begin - 1, 0)  # score only tokens not scored before
        lp = F.log_softmax(logits[new_from:], -1).gather(-1, targets[new_from:, None])
        nll -= float(lp.sum())
        counted += lp.shape[0]
        prev_end = end
        if progress:
            progress(i + 1, len(starts))
        if end == len(ids):
            break
    return {"perplexity": math.exp(nll / max(counted, 1)), "nll": nll / max(counted, 1), "tokens": counted,
            "window": window, "stride": stride}


@torch.no_grad()
def embeddings(model: nn.Module, examples: Tensor, batch_size: int = 8) -> Tensor:
    """Mean-pooled last hidden states (one vector per example)."""
    out = []
    for s in _batches(len(examples), batch_size):
        out.append(model(input_ids=examples[s]).last_hidden_state.float().mean(1))
    return torch.cat(out)


def embedding_agreement(a: Tensor, b: Tensor) -> dict:
    cos = F.cosine_similarity(a, b, dim=-1)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}


@torch.no_grad()
def image_logits(model: nn.Module, images: Tensor, batch_size: int = 16) -> Tensor:
    return torch.cat([model(images[s]).float() for s in _batches(len(images), batch_size)])


def top1(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


EVAL_SEQ_LEN = 512  # the perplexity window unless the model has fewer positions


def evaluate_model(loaded, model: nn.Module, data: str, seq_len: int | None, max_tokens: int,
                   text_field: str = "text") -> dict:
    """The figure a user judges a model by: perplexity (causal LM), top-1 (images) or embeddings (encoder).

    Refuses a sequence length the model cannot score (< 2, or beyond its positions) before reading data,
    and a non-finite result after (a NaN perplexity is a broken model, not a number to report).
    """
    if loaded.task == "image-classifier":
        images, labels = load_images(image_folder(data), timm_eval_transform(model))
        logits = image_logits(model, images.to(param_dtype(model)))
        check_finite("the model's outputs (logits)", logits)
        return {"metric": "top-1", "value": top1(logits, labels), "images": len(images), "_logits": logits}
    seq_len = seq_len_for(seq_len, getattr(model, "config", None), EVAL_SEQ_LEN)
    if loaded.tokenizer is None:
        raise OptionError(f"{loaded.source} has no tokenizer: it cannot be evaluated on text")
    ids = token_examples(loaded.tokenizer, read_texts(data, text_field), seq_len, max(1, max_tokens // seq_len))
    if loaded.task == "causal-lm":
        r = perplexity(model, ids, window=seq_len)
        check_finite("perplexity", r["perplexity"])
        return {"metric": "perplexity", "value": r["perplexity"], **{k: r[k] for k in ("tokens", "window", "stride")}}
    emb = embeddings(model, ids)
    check_finite("the model's embeddings", emb)
    return {"metric": "embedding", "value": None, "examples": len(ids), "_embeddings": emb}


def check_comparable(task_a: str, task_b: str, name_a: str = "the model", name_b: str = "--compare") -> None:
    """Two models can be compared only on the same kind of output (call before evaluating either)."""
    if task_a != task_b:
        raise OptionError(f"cannot compare {name_a} ({task_a}) with {name_b} ({task_b}): both must be the same kind of model")


def compare(before: dict, after: dict) -> dict:
    """Source (``before``) vs converted (``after``) on the same data; both results of :func:`evaluate_model`."""
    if before.get("metric") != after.get("metric"):
        raise OptionError(f"cannot compare a {before.get('metric')} result with a {after.get('metric')} result "
                          "(the two models are not the same kind)")
    if before["metric"] == "embedding":
        a, b = before.pop("_embeddings"), after.pop("_embeddings")
        if a.shape != b.shape:
            raise OptionError(f"cannot compare embeddings of width {a.shape[-1]} and {b.shape[-1]}")
        agree = embedding_agreement(a, b)
        out = {"metric": "embedding cosine (converted vs source)", "source": 1.0, "converted": agree["mean_cosine"],
               "min_cosine": agree["min_cosine"]}
    elif before["metric"] == "top-1":
        la, lb = before.pop("_logits"), after.pop("_logits")
        if la.shape != lb.shape:
            raise OptionError(f"cannot compare classifiers with {la.shape[-1]} and {lb.shape[-1]} classes")
        agree = float((la.argmax(-1) == lb.argmax(-1)).float().mean())
        out = {"metric": "top-1", "source": before["value"], "converted": after["value"], "prediction_agreement": agree}
    else:
        out = {"metric": before["metric"], "source": before["value"], "converted": after["value"],
               "relative_change": after["value"] / before["value"] - 1.0,
               **{k: before[k] for k in ("tokens", "window", "stride")}}
    check_finite(out["metric"], out)
    return out
