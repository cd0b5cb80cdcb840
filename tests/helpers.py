"""Small assertions shared by the test files."""
from __future__ import annotations

import subprocess


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    """The command failed with exit code 2 and one `camelid: error: ...` line holding each of `words`."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("camelid: error: "), proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]
