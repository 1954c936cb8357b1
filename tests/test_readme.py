"""The README's Python example runs as written (on the real default model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_starts_with_the_two_setup_commands():
    text = README.read_text()
    block = re.search(r"```sh\n(.*?)```", text, flags=re.S).group(1)
    cmds = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert cmds[:2] == ["make demo", "make test"]


def test_readme_api_example_runs(tmp_path, monkeypatch):
    blocks = _python_blocks()
    assert blocks, "the README has no Python example"
    monkeypatch.chdir(tmp_path)  # the example writes to ./out
    scope: dict = {}
    exec(compile(blocks[0], str(README), "exec"), scope)
    assert (tmp_path / "out" / "minilm-3b" / "gobo.safetensors").is_file()
    hidden = scope["hidden"]
    assert hidden.shape[0] == 1 and hidden.shape[-1] == 384
    assert scope["cm"].fp32_bytes() / scope["cm"].nbytes() > 10
