"""Offline data for the study: scikit-learn's digits (images) and text as bytes (CPython's reference manual by default)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

# The split is fixed (not a function of the run's seed) so every run sees the same examples.
_SPLIT_SEED = 12345


@dataclass
class ImageSplits:
    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]


def digits() -> ImageSplits:
    """1797 8×8 grey digits, scaled to [0, 1]; 60% train, 20% validation, 20% test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(_SPLIT_SEED))
    x, y = x[perm], y[perm]
    a, b = int(0.6 * len(x)), int(0.8 * len(x))
    return ImageSplits((x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:]))


DIGITS = "builtin:digits"


@lru_cache(maxsize=2)
def images(source: str = DIGITS, size: int = 8) -> ImageSplits:
    """Labelled images: scikit-learn's digits (``builtin:digits``) or an image folder (one subdirectory per
    class) resized to ``size``×``size`` RGB in [0, 1]; 60% train, 20% validation, 20% test (a fixed shuffle)."""
    if source == DIGITS:
        return digits()
    import numpy as np

    from ..data import DataError, image_folder, load_images

    folder = image_folder(source)
    if len(folder.classes) < 2:
        raise DataError(f"{source}: an image task needs one subdirectory per class (at least two)")
    x, y = load_images(folder, lambda im: torch.from_numpy(np.asarray(im.resize((size, size)), dtype=np.float32)).permute(2, 0, 1) / 255.0)
    y = y.long()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(_SPLIT_SEED))
    x, y = x[perm], y[perm]
    a, b = int(0.6 * len(x)), int(0.8 * len(x))
    return ImageSplits((x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:]))


def image_shape(task: dict) -> tuple[int, int, int]:
    """(channels, classes, side) of a vision task's images."""
    source = task.get("data", DIGITS)
    if source == DIGITS:
        return 1, 10, 8
    from ..data import image_folder

    return 3, len(image_folder(source).classes), task.get("image_size", 32)


@dataclass
class TextSplits:
    train: Tensor  # 1-D token ids (bytes: 0…255)
    val: Tensor
    test: Tensor


ByteSplits = TextSplits  # the name before tokenizers


def split_documents(source: str) -> tuple[list[str], list[str], list[str]]:
    """Train, validation and test documents, never sharing one.

    ``builtin:pydoc``: train on its train split; the eval split's documents alternate between validation
    and test (so each spans the whole manual, not one section).  Any other source (``ibnorm.data``'s
    reader): units are its documents when there are at least 40, else 4 KB blocks of the joined text;
    of every 20 units, the 19th goes to validation, the 20th to test, the rest to training.
    """
    from ..data import read_texts

    if source == "builtin:pydoc":
        held = read_texts("builtin:pydoc:eval")
        return read_texts("builtin:pydoc:train"), held[0::2], held[1::2]
    docs = read_texts(source)
    if len(docs) < 40:
        joined = "\n\n".join(docs)
        docs = [joined[i:i + 4096] for i in range(0, len(joined), 4096)]
    return [d for i, d in enumerate(docs) if i % 20 < 18], docs[18::20], docs[19::20]


def text_bytes(source: str = "builtin:pydoc") -> TextSplits:
    """The splits of :func:`split_documents` as UTF-8 bytes (documents joined by a blank line)."""
    def encode(docs: list[str]) -> Tensor:
        return torch.frombuffer(bytearray("\n\n".join(docs).encode("utf-8")), dtype=torch.uint8).long()

    return TextSplits(*(encode(d) for d in split_documents(source)))


@lru_cache(maxsize=4)
def load_tokenizer(name: str):
    """A subword tokenizer, offline: an installed short name (``smollm2-135m``: SmolLM2's 49,152-token BPE
    from its GGUF; ``minilm-l6``: MiniLM's 30,522-token WordPiece), a local Hugging Face directory or a
    ``.gguf`` file."""
    import transformers

    from ..data import DataError
    from ..io.sources import resolve_short_name

    path = Path(resolve_short_name(name))
    if not path.exists():
        raise DataError(f"tokenizer not found: {name} (an installed short name, a local directory or a .gguf file)")
    try:
        if path.suffix == ".gguf":
            return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many kinds; the user gets one line
        raise DataError(f"cannot load a tokenizer from {name}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def vocab_size(tokenizer: str | None) -> int:
    return 256 if tokenizer in (None, "bytes") else len(load_tokenizer(tokenizer))


@lru_cache(maxsize=2)
def text_splits(source: str, tokenizer: str | None = None) -> TextSplits:
    """Bytes (``tokenizer`` None or "bytes") or subword ids of every split; documents end with EOS.

    Subword ids of a corpus on disk are cached (``$IBNORM_CACHE`` or ``~/.cache/ibnorm``, keyed by the
    corpus's paths, sizes and times and the tokenizer), so each launched run does not re-tokenize gigabytes.
    """
    if tokenizer in (None, "bytes"):
        return text_bytes(source)
    cache = _token_cache(source, tokenizer)
    if cache is not None and cache.exists():
        return TextSplits(*(t.long() for t in torch.load(cache, weights_only=True)))
    splits = _tokenize(source, tokenizer)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        torch.save([t.int() for t in (splits.train, splits.val, splits.test)], tmp)
        os.replace(tmp, cache)
    return splits


def _token_cache(source: str, tokenizer: str) -> Path | None:
    import hashlib

    path = Path(source)
    if not path.exists():
        return None  # builtin text: small, tokenized in a moment
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    key = json.dumps([tokenizer, str(path.resolve()), [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]])
    root = Path(os.environ.get("IBNORM_CACHE", Path.home() / ".cache" / "ibnorm"))
    return root / "study-tokens" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".pt")


def _tokenize(source: str, tokenizer: str) -> TextSplits:
    tok = load_tokenizer(tokenizer)
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id

    def encode(docs: list[str]) -> Tensor:
        ids = tok(docs, add_special_tokens=False, verbose=False)["input_ids"] if docs else []
        return torch.tensor([t for d in ids for t in (*d, *(() if eos is None else (eos,)))], dtype=torch.long)

    return TextSplits(*(encode(d) for d in split_documents(source)))


def eval_windows(ids: Tensor, seq_len: int, max_windows: int | None = None) -> Tensor:
    """Non-overlapping windows of ``seq_len + 1`` bytes (inputs and next-byte targets) covering ``ids``;
    when there are more than ``max_windows``, a fixed random sample of that many (the same for every run)."""
    n = (len(ids) - 1) // seq_len
    starts = torch.arange(n) * seq_len
    if max_windows is not None and n > max_windows:
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(_SPLIT_SEED))[:max_windows]
        starts = starts[pick.sort().values]
    return torch.stack([ids[s:s + seq_len + 1] for s in starts.tolist()])


def train_windows(ids: Tensor, seq_len: int, batch: int, g: torch.Generator) -> Tensor:
    starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=g)
    return torch.stack([ids[s:s + seq_len + 1] for s in starts.tolist()])
