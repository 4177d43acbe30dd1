"""A local corpus of ordinary English prose, built from text the installed packages ship (no network).

    python benchmarks/english_corpus.py OUT.txt

nltk is installed without its corpora (no Brown corpus here), so the prose comes from:
* the prose paragraphs of the installed distributions' descriptions (``*.dist-info/METADATA`` bodies:
  READMEs) — paragraphs of at least 12 words, almost all letters and punctuation, no markup or code;
* scikit-learn's dataset descriptions (``sklearn/datasets/descr/*.rst``), the same filter;
* the license texts the distributions ship (deduplicated).
The files are read in sorted order, so the corpus is the same for the same installed packages.
It is harder text for a model trained on web and code than CPython's manual (builtin:pydoc).
"""

from __future__ import annotations

import hashlib
import re
import site
import sys
from pathlib import Path

_PROSE_CHARS = re.compile(r"[A-Za-z ,.;:'\"()\-?!]")
_MARKUP = ("```", "|", "<", ">", "[!", "::", "==", "$", "{", "}", "http", ">>>", "    ")


def _prose_paragraphs(text: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", text):
        para = " ".join(para.split("\n")).strip()
        words = para.split()
        if len(words) < 12 or any(m in para for m in _MARKUP) or para.lstrip().startswith(("#", "*", "-", "=")):
            continue
        if len(_PROSE_CHARS.findall(para)) >= 0.97 * len(para):
            out.append(para)
    return out


def _metadata_body(path: Path) -> str:
    text = path.read_text(errors="replace")
    return text.split("\n\n", 1)[1] if "\n\n" in text else ""


def build(out: str | Path) -> dict:
    """Write the corpus to ``out``; return its size in documents, words and characters."""
    root = Path(next(p for p in site.getsitepackages() if Path(p).is_dir()))
    docs: list[str] = []
    seen: set[str] = set()

    def add(text: str) -> None:
        key = hashlib.sha256(" ".join(text.split()).lower().encode()).hexdigest()
        if text.strip() and key not in seen:
            seen.add(key)
            docs.append(text.strip())

    for meta in sorted(root.glob("*.dist-info/METADATA")):
        paragraphs = _prose_paragraphs(_metadata_body(meta))
        if paragraphs:
            add("\n\n".join(paragraphs))
    for descr in sorted(root.glob("sklearn/datasets/descr/*.rst")):
        paragraphs = _prose_paragraphs(descr.read_text(errors="replace"))
        if paragraphs:
            add("\n\n".join(paragraphs))
    for lic in sorted([*root.glob("*.dist-info/LICEN[CS]E*"), *root.glob("*.dist-info/licenses/**/*")]):
        if lic.is_file() and lic.stat().st_size < 200_000:
            add(lic.read_text(errors="replace"))
    text = "\n\n".join(docs) + "\n"
    Path(out).write_text(text)
    return {"documents": len(docs), "words": len(text.split()), "characters": len(text)}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.split("\n\n")[1])
    print(build(sys.argv[1]))
