"""Memory measured in a child process: its own resident sizes, not the test runner's."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

#: Prepended to every child: `mark()` restarts the peak at the current size (Linux's
#: clear_refs), `peak_mb()` and `rss_mb()` read the child's peak and current resident MB.
_PRELUDE = '''
from pathlib import Path

def _status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

def mark():
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")

def peak_mb():
    return _status("VmHWM")

def rss_mb():
    return _status("VmRSS")
'''


def needs_proc() -> None:
    """Skip where resident sizes cannot be read (not Linux)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to measure a process's memory")


def run_child(code: str, *args: str) -> object:
    """Run `code` (after the prelude) in a fresh interpreter; its last stdout line, as JSON."""
    script = _PRELUDE + textwrap.dedent(code)
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
