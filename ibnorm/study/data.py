"""Offline data for the study: scikit-learn's digits (images) and CPython's reference manual (bytes)."""

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
    """Byte-level text.  ``builtin:pydoc``: train on the train split, validation and test are the
    two halves of the eval split (documents never shared).  Any other source: ``ibnorm.data``'s
    reader, split 90/5/5 by bytes."""
    from ..data import read_texts

    def encode(docs: list[str]) -> Tensor:
        return torch.frombuffer(bytearray("\n\n".join(docs).encode("utf-8")), dtype=torch.uint8).long()

    if source == "builtin:pydoc":
        train, held = encode(read_texts("builtin:pydoc:train")), encode(read_texts("builtin:pydoc:eval"))
        half = len(held) // 2
        return ByteSplits(train, held[:half], held[half:])
    allb = encode(read_texts(source))
    a, b = int(0.9 * len(allb)), int(0.95 * len(allb))
    return ByteSplits(allb[:a], allb[a:b], allb[b:])


def eval_windows(ids: Tensor, seq_len: int, max_windows: int) -> Tensor:
    """Non-overlapping windows of ``seq_len + 1`` bytes (inputs and next-byte targets)."""
    n = min(max_windows, (len(ids) - 1) // seq_len)
    return torch.stack([ids[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)])


def train_windows(ids: Tensor, seq_len: int, batch: int, g: torch.Generator) -> Tensor:
    starts = torch.randint(0, len(ids) - seq_len - 1, (batch,), generator=g)
    return torch.stack([ids[s:s + seq_len + 1] for s in starts.tolist()])
