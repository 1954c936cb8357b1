"""Shared by the benchmark scripts: the OpenMP wait policy they measure under, and the
requested models that are installed here."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterable, Iterator


def set_omp_wait_policy() -> None:
    """Idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``) unless the
    caller set a policy; ``OMP_WAIT_POLICY=default`` leaves the runtime's own (spin a while,
    then sleep: what a process that sets nothing gets). Read when torch loads its OpenMP
    runtime, so call it before importing torch."""
    if os.environ.get("OMP_WAIT_POLICY") == "default":
        del os.environ["OMP_WAIT_POLICY"]
    else:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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
