"""Shared by the benchmark scripts: the requested models that are installed here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable, Iterator


def installed(names: Iterable[str]) -> Iterator[tuple[str, Path]]:
    """``(name, model directory)`` for each name that resolves; the others are skipped with a
    one-line reason on stderr (``gobo models fetch NAME`` installs a bundled one)."""
    from gobo.assets import resolve_model

    for name in names:
        try:
            path = resolve_model(name)
        except FileNotFoundError as exc:
            print(f"skipping {name}: {exc}", file=sys.stderr)
            continue
        yield name, path
