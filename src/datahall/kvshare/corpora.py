"""Offline text for fine-tuning variants and building evaluation tasks.

Three sources that ship with Python or Debian, each split deterministically into ``train``
(fine-tuning) and ``eval`` (tasks and profiling) by a hash of the item's key, so a variant is
never evaluated on what it was trained on:

- :func:`stdlib_sources`: CPython standard-library modules (code);
- :func:`pydoc_topics`: the 79 ``pydoc_data.topics`` help texts (documentation);
- :func:`dictionary_entries`: WordNet noun glosses from Debian's ``wordnet-base``
  (definitions).

>>> split_of("json/encoder.py") in ("train", "eval")
True
"""

from __future__ import annotations

import hashlib
import sysconfig
from functools import cache
from pathlib import Path
from typing import Literal

__all__ = ["Split", "split_of", "stdlib_sources", "pydoc_topics", "dictionary_entries", "WORDNET"]

Split = Literal["train", "eval"]
WORDNET = Path("/usr/share/wordnet/data.noun")
TRAIN_SHARE = 7  # of 10


def split_of(key: str) -> Split:
    """``train`` for 70% of keys and ``eval`` for the rest, by SHA-256 (stable across runs)."""
    return "train" if hashlib.sha256(key.encode()).digest()[0] % 10 < TRAIN_SHARE else "eval"


def _check(split: str) -> None:
    if split not in ("train", "eval"):
        raise ValueError(f"split must be train or eval, got {split!r}")


@cache
def _stdlib() -> tuple[tuple[str, str], ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        rel = path.relative_to(root).as_posix()
        if (
            rel.startswith(("test", "idlelib", "site-packages", "lib2to3", "__phello__"))
            or "/test" in rel
        ):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if 2_000 <= len(text) <= 400_000:
            out.append((rel, text))
    return tuple(out)


def stdlib_sources(split: Split) -> list[tuple[str, str]]:
    """(relative path, source) of standard-library modules of 2–400 kB, sorted by path."""
    _check(split)
    return [(k, t) for k, t in _stdlib() if split_of(k) == split]


def pydoc_topics(split: Split) -> list[tuple[str, str]]:
    """(topic, help text) from ``pydoc_data.topics``, sorted by topic."""
    _check(split)
    from pydoc_data.topics import topics

    return [(k, topics[k]) for k in sorted(topics) if split_of(k) == split]


@cache
def _wordnet() -> tuple[tuple[str, str], ...]:
    if not WORDNET.is_file():
        raise ValueError(
            f"{WORDNET} is missing: install Debian's wordnet-base (apt-get install wordnet-base; "
            "make test does it when run as root)"
        )
    out = []
    seen = set()
    for line in WORDNET.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("  ") or "|" not in line:
            continue
        head, gloss = line.split("|", 1)
        parts = head.split()
        word = parts[4].replace("_", " ")
        definition = gloss.split(";")[0].strip()
        if word in seen or not word.isalpha() or len(definition) < 20:
            continue
        seen.add(word)
        out.append((word, definition))
    return tuple(out)


def dictionary_entries(split: Split) -> list[tuple[str, str]]:
    """(word, definition) of WordNet nouns (single alphabetic words, the gloss's first part)."""
    _check(split)
    return [(w, d) for w, d in _wordnet() if split_of(w) == split]
