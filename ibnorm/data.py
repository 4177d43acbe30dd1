"""Calibration and evaluation data: text (files, directories, jsonl, builtin) and image folders."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .errors import IBNormError
from .validate import check_not_special

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")
BUILTIN_PREFIX = "builtin:"


class DataError(IBNormError):
    pass


def _builtin_pydoc(split: str) -> list[str]:
    """English prose of the Python reference manual, shipped with CPython (pydoc_data).

    Topics in sorted order alternate between the ``train`` and ``eval`` splits, so the
    two never share a document.
    """
    from pydoc_data.topics import topics

    keys = sorted(topics)
    if split == "train":
        keys = keys[0::2]
    elif split == "eval":
        keys = keys[1::2]
    elif split != "all":
        raise DataError(f"unknown split {split!r} of builtin:pydoc; use builtin:pydoc:train, :eval or :all")
    return [topics[k] for k in keys]


def _builtin_english(split: str) -> list[str]:
    """English prose whose content is fixed: the WordNet 3.0 glosses that timm ships for the
    ImageNet-21k synsets (``timm/data/_info/imagenet_synset_to_definition.txt``, 21,843 glosses, ~1.7 MB),
    each written as a sentence "LEMMAS: GLOSS." (lemmas from the ``imagenet_synset_to_lemma.txt`` next
    to it): 1,366 documents, 2.1 MB (with timm 1.0.31 the sha256 of the documents joined by NUL starts
    439c5d9df2246f43; a timm that changed these files would change it).

    Built as documents of 16 consecutive glosses in synset order (WordNet groups related senses, so a
    document reads as a short glossary of one domain); document ``i`` goes to ``test`` when i % 10 == 0,
    to ``val`` when i % 10 == 1, to ``train`` otherwise (80/10/10, split by document, no document in
    two splits).  No other text is mixed in, so the corpus is byte-identical on every install of timm
    that ships these files; it is not the calibration text (``builtin:pydoc``) and not CPython's manual.
    """
    from importlib.resources import files

    if split not in ("train", "val", "test", "all"):
        raise DataError(f"unknown split {split!r} of builtin:english; use builtin:english:train, :val, :test or :all")
    info = files("timm.data") / "_info"
    glosses = dict(line.split("\t", 1) for line in (info / "imagenet_synset_to_definition.txt").read_text("utf-8").splitlines() if "\t" in line)
    lemmas = dict(line.split("\t", 1) for line in (info / "imagenet_synset_to_lemma.txt").read_text("utf-8").splitlines() if "\t" in line)
    sentences = [f"{lemmas.get(k, k).strip()}: {glosses[k].strip().rstrip('.')}." for k in sorted(glosses)]
    docs = ["\n".join(sentences[i : i + 16]) for i in range(0, len(sentences), 16)]
    keep = {"test": lambda i: i % 10 == 0, "val": lambda i: i % 10 == 1, "train": lambda i: i % 10 > 1, "all": lambda i: True}[split]
    return [d for i, d in enumerate(docs) if keep(i)]


BUILTIN_TEXT = {"pydoc": _builtin_pydoc, "english": _builtin_english}


def read_texts(source: str, text_field: str = "text") -> list[str]:
    """Documents from a text file, a directory of text files, a jsonl file or ``builtin:NAME[:SPLIT]``."""
    if source.startswith(BUILTIN_PREFIX):
        name, _, split = source[len(BUILTIN_PREFIX) :].partition(":")
        if name not in BUILTIN_TEXT:
            raise DataError(f"unknown builtin data {name!r}; available: {', '.join(BUILTIN_TEXT)}")
        return BUILTIN_TEXT[name](split or "all")
    path = Path(source)
    if not path.exists():
        raise DataError(f"data not found: {source}")
    check_not_special(path)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        docs = _saved_dataset_texts(path, text_field)
    elif path.suffix.lower() == ".parquet":
        docs = _parquet_texts(path, text_field)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + (".jsonl", ".parquet"))
        docs = [d for f in files for d in read_texts(str(f), text_field)]
    elif path.suffix.lower() == ".jsonl":
        docs = _jsonl_texts(path, text_field)
    else:
        try:
            docs = [path.read_bytes().decode("utf-8")]
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text (byte {e.start})") from None
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror}") from None
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"no text found in {source}")
    return docs


def _jsonl_texts(path: Path, text_field: str) -> list[str]:
    """One document per line; every line must decode as UTF-8 and parse as a JSON object holding ``text_field``."""
    docs = []
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    for lineno, line_bytes in enumerate(raw.split(b"\n"), 1):
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{path}:{lineno}: not UTF-8 text") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise DataError(f"{path}:{lineno}: not valid JSON") from None
        if not isinstance(row, dict) or text_field not in row:
            raise DataError(f"{path}:{lineno}: no {text_field!r} field (set --text-field)")
        if not isinstance(row[text_field], str):
            raise DataError(f"{path}:{lineno}: field {text_field!r} is a {type(row[text_field]).__name__}, not text")
        docs.append(row[text_field])
    return docs


def _parquet_texts(path: Path, text_field: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=[text_field])
    except Exception as e:
        raise DataError(f"{path}: cannot read column {text_field!r} ({type(e).__name__}); set --text-field") from None
    return [str(t) for t in table.column(text_field).to_pylist() if t is not None]


def _saved_dataset_texts(path: Path, text_field: str) -> list[str]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path}: not a readable saved dataset ({type(e).__name__})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if text_field not in ds.column_names:
        raise DataError(f"{path}: no {text_field!r} column (columns: {', '.join(ds.column_names)}); set --text-field")
    return [str(t) for t in ds[text_field] if t is not None]


def token_examples(tokenizer, texts: Sequence[str], seq_len: int, max_examples: int | None = None) -> torch.Tensor:
    """Tokenize, join documents with EOS, and pack into ``(examples, seq_len)`` token ids."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise DataError(f"sequence length must be a positive number of tokens, got {seq_len!r}")
    if max_examples is not None and max_examples < 1:
        raise DataError(f"number of samples must be ≥ 1, got {max_examples}")
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    need = None if max_examples is None else max_examples * seq_len
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // seq_len
    if max_examples is not None:
        n = min(n, max_examples)
    if n == 0:
        raise DataError(f"not enough text for one example of {seq_len} tokens ({len(ids)} tokens found)")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


@dataclass
class ImageFolder:
    """``root/CLASS/image`` files; labels are class indices in sorted order."""

    paths: list[Path]
    labels: list[int]
    classes: list[str]


def image_folder(source: str) -> ImageFolder:
    root = Path(source)
    if not root.is_dir():
        raise DataError(f"image folder not found: {source}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    paths, labels = [], []
    if classes:
        for i, c in enumerate(classes):
            for p in sorted((root / c).rglob("*")):
                if p.suffix.lower() in IMAGE_SUFFIXES:
                    paths.append(p)
                    labels.append(i)
    else:
        paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        labels = [-1] * len(paths)
    if not paths:
        raise DataError(f"no images found in {source}")
    return ImageFolder(paths, labels, classes)


def is_image_folder(source: str) -> bool:
    root = Path(source)
    if not root.is_dir():
        return False
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.rglob("*") if p.is_file())


def load_images(folder: ImageFolder, transform, max_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    n = len(folder.paths) if max_images is None else min(max_images, len(folder.paths))
    xs = []
    for p in folder.paths[:n]:
        xs.append(transform(_open_rgb(p)))
    return torch.stack(xs), torch.tensor(folder.labels[:n])


def timm_eval_transform(model) -> Callable:
    """timm's deterministic evaluation transform for ``model`` (resize, crop, normalize)."""
    import timm

    return timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))


def param_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype a model's inputs take: its first floating parameter's (float32 if none)."""
    p = next(iter(model.parameters()), None)
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


def _open_rgb(path: Path):
    """One image, decoded completely (a truncated file fails here, not inside the transform)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        # PIL reports truncation as OSError and some corrupt headers as SyntaxError/ValueError
        raise DataError(f"{path}: not a readable image ({type(e).__name__})") from None
    except Image.DecompressionBombError:
        raise DataError(f"{path}: image too large (decompression bomb guard)") from None


def check_images(folder: ImageFolder, max_images: int | None = None) -> int:
    """Decode the images a run will use, before any model work; returns how many were checked."""
    n = len(folder.paths) if max_images is None else min(max_images, len(folder.paths))
    for p in folder.paths[:n]:
        _open_rgb(p)
    return n


def check_text_data(source: str, text_field: str = "text") -> int:
    """Read (and so validate) text data before any model work; returns the number of documents."""
    return len(read_texts(source, text_field))
