"""Run the ``sameguard`` command line in-process for tests: ``run("fit", ...) -> (exit status, stdout)``."""

from __future__ import annotations

import io
from contextlib import redirect_stdout

from sameguard.cli import main


def run(*argv: str) -> tuple[int, str]:
    """``sameguard *argv`` in this process; its exit status and what it printed on standard output."""
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()
