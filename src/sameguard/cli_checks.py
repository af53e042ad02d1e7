"""Checks the command line runs before any work starts, so that a long run cannot fail at its end.

* :func:`check_device`: ``--device`` names a device this PyTorch build can use.
* :func:`check_output_file` / :func:`check_output_dir`: an output path can be written (its folder
  exists, it is not a folder where a file is expected or a file where a folder is expected).
* :func:`check_data_dir`: ``--data-dir`` is an existing folder (never silently ignored).
* :func:`check_sqlite_url`: a SQLite database file can be created, or, for commands that only read
  it, already exists.
* :func:`check_port_free`: the service's port is free before the models are loaded.
* :func:`comma_ints`: an ``argparse`` type for lists such as ``--budgets 1000,4000``.

Each raises :class:`ValueError` with one sentence that says what was expected.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
from pathlib import Path

__all__ = [
    "OUTPUTS",
    "check_data_dir",
    "check_device",
    "check_output_dir",
    "check_output_file",
    "check_port_free",
    "check_sqlite_url",
    "comma_ints",
]

#: Output paths per command, checked before the command runs: ``(attribute, "file" or "dir", flag)``.
OUTPUTS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "train-victim": (("out", "dir", "--out"),),
    "fit": (("out", "dir", "--out"),),
    "score": (("out", "file", "--out"),),
    "demo": (("workdir", "dir", "--workdir"),),
    "attack": (("save", "dir", "--save"), ("scores_out", "file", "--scores-out")),
    "bench-attacks": (("json", "file", "--json"),),
    "bench": (("out", "dir", "--out"),),
    "same-study": (("out", "file", "--out"), ("workdir", "dir", "--workdir")),
    "alarms": (("out", "dir", "--out"),),
    "bench-service": (("out", "file", "--out"), ("workdir", "dir", "--workdir")),
    "audit": (("export", "file", "--export"),),
}


def check_device(spec: str | None, flag: str = "--device") -> None:
    """Raise ``ValueError`` unless ``spec`` (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ``auto``...) can be used here."""
    if spec is None or spec == "auto":
        return
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"{flag} {spec!r} is not a torch device: use cpu, cuda, cuda:N, mps or auto.") from None
    if device.type == "cpu":
        return
    if device.type == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise ValueError(f"{flag} {spec}: this PyTorch build ({torch.__version__}) has no CUDA support; use "
                             "--device cpu, or install a CUDA build of PyTorch.")
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {spec}: no CUDA GPU is visible to this process; use --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}).")
        return
    backend = getattr(torch.backends, device.type, None) or getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ValueError(f"{flag} {spec}: this machine or PyTorch build has no {device.type} device; use "
                         "--device cpu.")


def check_output_file(path: str | os.PathLike | None, flag: str) -> None:
    """Raise ``ValueError`` unless a file can be written at ``path`` (``-``: standard output)."""
    if path is None or str(path) == "-":
        return
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {p} is a folder; give the name of a file to write.")
    folder = p.parent
    if not folder.is_dir():
        raise ValueError(f"{flag} {p}: the folder {folder} does not exist; create it first (nothing was run).")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"{flag} {p}: the folder {folder} is not writable.")
    if p.exists() and not os.access(p, os.W_OK):
        raise ValueError(f"{flag} {p} exists and is not writable.")


def check_output_dir(path: str | os.PathLike | None, flag: str) -> None:
    """Raise ``ValueError`` unless a folder can be created (or reused) at ``path``.

    Missing parent folders are fine (they are created), but the nearest existing one must be a
    writable folder, and ``path`` itself must not be an existing file.
    """
    if path is None:
        return
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{flag} {p} is an existing file, not a folder; give the name of a folder to write to.")
    existing = p
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {p}: {existing} is a file, so the folder cannot be created.")
    if not os.access(existing, os.W_OK):
        raise ValueError(f"{flag} {p}: the folder {existing} is not writable.")


def check_data_dir(path: str | os.PathLike | None, flag: str = "--data-dir") -> None:
    """Raise ``ValueError`` when ``--data-dir`` is given but is not an existing folder."""
    if path is not None and not Path(path).expanduser().is_dir():
        raise ValueError(f"{flag} {path} is not an existing folder; it should hold the dataset files (e.g. "
                         f"{Path(path) / 'fashion-mnist'}/train-images-idx3-ubyte.gz).")


def check_sqlite_url(url: str, *, must_exist: bool) -> None:
    """For a file-backed SQLite URL: its folder must exist, and with ``must_exist`` the file too.

    Other URLs (PostgreSQL, in-memory SQLite) are left to the driver.
    """
    if not url.startswith("sqlite"):
        return
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        database = make_url(url).database
    except (ArgumentError, ValueError):  # the service's own parser reports a malformed URL in one sentence
        return
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    if must_exist and not path.is_file():
        raise ValueError(f"There is no database at {path} (from --db {url}); this command reads an existing "
                         "database and does not create one: check the path.")
    if not path.parent.is_dir():
        raise ValueError(f"The folder {path.parent} of the database {url} does not exist; create it or fix --db.")


def check_port_free(host: str, port: int) -> None:
    """Raise ``ValueError`` when ``host:port`` cannot be bound (in use, or not an address of this machine)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ValueError(f"Port {port} on {host} is already in use (another 'sameguard serve'?); stop it "
                                 "or choose another with --port.") from None
            raise ValueError(f"Cannot listen on {host}:{port} ({exc.strerror}); check --host and --port.") from None


def comma_ints(text: str, minimum: int = 1) -> list[int]:
    """``"1000,4000"`` -> ``[1000, 4000]``, for ``argparse``'s ``type=``; each must be a positive integer
    (at least ``minimum``: ``functools.partial(comma_ints, minimum=0)`` for seeds)."""
    kind = "positive integers" if minimum == 1 else f"integers of at least {minimum}"
    values = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            value = int(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind}, got {item!r} in {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {kind}, got {value} in {text!r}")
        values.append(value)
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one integer, got {text!r}")
    return values


def pool_size_arg(text: str) -> int | None:
    """An image size for the stream test's pooling (an integer >= 1), or ``none`` for every pixel."""
    if text.strip().lower() in ("none", "full"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'none' nor an integer size") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"the pooled size must be at least 1, got {value}")
    return value
