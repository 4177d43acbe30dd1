"""Offline data for the study: scikit-learn's digits (images) and text as bytes (CPython's reference manual by default)."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class ByteSplits:
    train: Tensor  # 1-D uint8 → long byte ids
    val: Tensor
    test: Tensor


def text_bytes(source: str = "builtin:pydoc") -> ByteSplits:
    """Byte-level text split into train, validation and test, never sharing a document.

    ``builtin:pydoc``: train on its train split; the eval split's documents alternate between validation
    and test (so each spans the whole manual, not one section).  Any other source (``ibnorm.data``'s
    reader): units are its documents when there are at least 40, else 4 KB blocks of the joined text;
    of every 20 units, the 19th goes to validation, the 20th to test, the rest to training.
    """
    from ..data import read_texts

    def encode(docs: list[str]) -> Tensor:
        return torch.frombuffer(bytearray("\n\n".join(docs).encode("utf-8")), dtype=torch.uint8).long()

    if source == "builtin:pydoc":
        held = read_texts("builtin:pydoc:eval")
        return ByteSplits(encode(read_texts("builtin:pydoc:train")), encode(held[0::2]), encode(held[1::2]))
    docs = read_texts(source)
    if len(docs) < 40:
        joined = "\n\n".join(docs)
        docs = [joined[i:i + 4096] for i in range(0, len(joined), 4096)]
    return ByteSplits(encode([d for i, d in enumerate(docs) if i % 20 < 18]), encode(docs[18::20]), encode(docs[19::20]))


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
