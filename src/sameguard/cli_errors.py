"""How the command line reports a failure: one sentence on standard error and an exit status.

Every ``sameguard`` command runs inside :func:`run_reporting_errors`. What a user can fix (a missing
file, a wrong value, a database that cannot be opened, an output folder that does not exist, a
device this PyTorch build lacks, ...) ends with exit status :data:`USAGE_ERROR` (2) and one line::

    sameguard score: error: queries/bad.png is not a PNG image (cannot identify image file ...).

Anything else is a bug in sameguard: one line that says so, exit status :data:`INTERNAL_ERROR` (1).
``-v`` adds the traceback above the line in both cases. Standard output closed by its reader
(``sameguard audit --export - | head``) ends the command quietly with one line and status 2, and
Ctrl-C with status 130.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable

from .api import SameguardError

logger = logging.getLogger("sameguard.cli")

__all__ = [
    "INTERNAL_ERROR",
    "INTERRUPTED",
    "USAGE_ERROR",
    "describe_error",
    "one_sentence",
    "run_reporting_errors",
    "silence_stdout",
]

#: Exit status of an error the user can fix (the same as argparse's usage errors).
USAGE_ERROR = 2
#: Exit status of an unexpected error (a bug).
INTERNAL_ERROR = 1
#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130

#: Errors whose message is written for the user: they end with :data:`USAGE_ERROR`.
_USER_ERRORS: tuple[type[BaseException], ...] = (SameguardError, ValueError, OSError)


def one_sentence(text: str) -> str:
    """``text`` on one line: line breaks and list bullets become ``"; "``, runs of spaces one space."""
    parts = [re.sub(r"^\s*[-*]\s+", "", line).strip() for line in str(text).splitlines()]
    joined = "; ".join(p for p in parts if p)
    joined = re.sub(r":;\s*", ": ", joined)
    return re.sub(r"\s+", " ", joined).strip()


def _database_error(exc: BaseException, args: argparse.Namespace | None) -> str | None:
    """The sentence for a SQLAlchemy error (``None`` for any other error)."""
    if not type(exc).__module__.startswith("sqlalchemy"):
        return None
    url = getattr(args, "db", None) or os.environ.get("SAMEGUARD_DB_URL") or "sqlite:///sameguard.db"
    from .service.db import redact_url  # a SQLAlchemy error means the serve extra is installed

    url = redact_url(url)
    reason = getattr(exc, "orig", None) or exc
    return f"the database {url} could not be used ({one_sentence(str(reason)).rstrip('.')}); check --db."


def describe_error(exc: BaseException, args: argparse.Namespace | None = None) -> tuple[str, int]:
    """``(one sentence, exit status)`` for an exception raised by a command."""
    database = _database_error(exc, args)
    if database is not None:
        return database, USAGE_ERROR
    if isinstance(exc, _USER_ERRORS):
        text = str(exc)
        if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
            text = f"{exc.filename}: {exc.strerror}"
            if isinstance(exc, FileExistsError):
                text += " (a file is in the way of the output)"
        return one_sentence(text) or type(exc).__name__, USAGE_ERROR
    return (f"unexpected {type(exc).__name__}: {one_sentence(str(exc))} (this is a bug in sameguard; run again "
            "with -v for the traceback)"), INTERNAL_ERROR


def silence_stdout() -> None:
    """Point file descriptor 1 at ``/dev/null`` so that the interpreter's last flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (tests) or already closed
        pass


def run_reporting_errors(command: str, action: Callable[[], int], *, args: argparse.Namespace | None = None,
                         verbose: int = 0) -> int:
    """Run ``action()`` and turn any exception into one line on standard error and an exit status.

    Args:
        command: the sub-command's name, for the prefix ``sameguard <command>: error:``.
        action: runs the command and returns its exit status.
        args: the parsed arguments (used to name the database in database errors).
        verbose: with ``>= 1`` the traceback is printed above the line.
    """
    prefix = f"sameguard {command}: error:" if command else "sameguard: error:"
    try:
        return action()
    except BrokenPipeError:
        silence_stdout()
        _say(f"{prefix} standard output was closed before everything was written (e.g. piped into 'head'); "
             "the rest of the output was dropped.")
        return USAGE_ERROR
    except KeyboardInterrupt:
        _say(f"sameguard {command}: interrupted.")
        return INTERRUPTED
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - every error is reported in one sentence; -v shows the traceback
        sentence, status = describe_error(exc, args)
        if verbose:
            traceback.print_exception(exc, file=sys.stderr)
        _say(f"{prefix} {sentence}")
        return status


def _say(line: str) -> None:
    """Write one line to standard error (which may itself be closed)."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # pragma: no cover - nowhere left to report
        pass
