"""Every ```bash block of the README runs, as a user would type it, in a scratch copy.

`pip install` commands are dropped (the test environment was installed by exactly those commands
in .ci/run), and the block that runs the test suite itself is not re-entered.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def _runnable(block: str) -> str:
    """Drop pip installs and join continuation lines, keeping the commands' own flags."""
    text = block.replace("\\\n", " ")
    lines = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split("&&")]
        parts = [p for p in parts if p and not p.startswith("pip install")]
        if parts:
            lines.append(" && ".join(parts))
    return "\n".join(lines)


def test_readme_has_the_two_quick_start_commands() -> None:
    assert BLOCKS[0].strip().startswith("pip install . && onnxshrink compress sample_models/")
    assert BLOCKS[1].strip().startswith('pip install -e ".[test]" && python -m pytest')


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index: int, tmp_path: Path) -> None:
    script = _runnable(BLOCKS[index])
    if "pytest" in script:
        pytest.skip("the block that runs this test suite")
    shutil.copytree(ROOT / "sample_models", tmp_path / "sample_models")
    shutil.copytree(ROOT / "rules", tmp_path / "rules")
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


PY_BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(PY_BLOCKS)))
def test_readme_python_block_runs(index: int, tmp_path: Path) -> None:
    shutil.copytree(ROOT / "sample_models", tmp_path / "sample_models")
    proc = subprocess.run([sys.executable, "-c", PY_BLOCKS[index]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()
