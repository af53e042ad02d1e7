"""A light HTTP load generator for ``bench-service``, run in a process of its own.

``bench-service`` used to send its requests from ``concurrency`` threads of its own process, each with
an ``httpx.Client``, a full HTTP client in Python, and its threads shared the GIL with the in-process
server and the two cores with the worker processes under test: the load generator took a large share of
what it was measuring. This one runs in a child process (no GIL shared
with the server) and drives all its connections from one ``asyncio`` loop (``uvloop`` when installed),
sending pre-built HTTP/1.1 requests on keep-alive connections and reading only the status line, the
headers it needs and the body (``bench-service`` reports its CPU time per request).

What it measures is what the threaded client measured: per request, the time from sending the request to
having read the whole response (seconds, ``time.perf_counter``), and the number of requests that did not
get a ``200`` (an error status, a dropped connection, a timeout); plus the wall time from the first
request to the last response.

The child reads its job as JSON on stdin and writes its result as JSON on stdout; it imports nothing
outside the standard library (and ``uvloop`` if present), so it starts in a fraction of a second::

    python .../load_client.py < job.json  # {"host", "port", "requests": [[...]], "n", "concurrency", "timeout"}

``requests[i]`` holds client ``i``'s pre-built requests (one per body, cycled); the result is
``{"latencies", "errors", "wall"}``.

:func:`time_requests` is the parent's side.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["LOAD_CLIENTS", "build_request", "time_requests"]

#: The load generators ``bench-service`` can send with: ``"raw"`` (default), this module; ``"httpx"``, client
#: threads of the benchmark's own process with an ``httpx.Client`` each (what every figure before the ``raw``
#: client was measured with).
LOAD_CLIENTS = ("raw", "httpx")


def build_request(host: str, port: int, path: str, headers: Mapping[str, str], body: str | bytes) -> bytes:
    """One keep-alive ``POST`` as the bytes sent on the wire (``Content-Length`` set from ``body``)."""
    data = body.encode() if isinstance(body, str) else bytes(body)
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(data)}"]
    for name, value in headers.items():
        if name.lower() in ("host", "content-length", "connection", "transfer-encoding"):
            raise ValueError(f"header {name!r} is set by the load client itself.")
        if any(c in f"{name}{value}" for c in "\r\n"):
            raise ValueError("header names and values must not contain line breaks.")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


def time_requests(url: str, headers: Sequence[Mapping[str, str]], bodies: Sequence[str], n_requests: int,
                  concurrency: int, *, path: str = "/v1/predict", timeout: float = 120.0
                  ) -> tuple[list[float], int, float]:
    """Send ``n_requests`` ``POST path`` requests to ``url`` from a child process over ``concurrency``
    keep-alive connections; connection ``i`` sends with ``headers[i mod len(headers)]`` (one API key per
    client), request ``k`` carries ``bodies[k mod len(bodies)]``.

    Returns:
        ``(latencies, errors, wall)``: one latency in seconds per request, the requests not answered with
        ``200`` (error status, dropped connection or timeout), and the seconds from the first request sent
        to the last response read.

    Raises:
        ValueError: non-positive counts, no headers or bodies, or a URL that is not ``http://host:port``.
        RuntimeError: the child failed (its stderr's tail in the message).
    """
    if n_requests < 1 or concurrency < 1:
        raise ValueError("n_requests and concurrency must be positive integers.")
    if not headers or not bodies:
        raise ValueError("headers and bodies must not be empty.")
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname or parts.port is None:
        raise ValueError(f"url must be http://HOST:PORT, got {url!r}.")
    host, port = parts.hostname, parts.port
    requests = [[build_request(host, port, path, h, b).decode("latin-1") for b in bodies] for h in headers]
    job = {"host": host, "port": port, "requests": requests, "n": n_requests, "concurrency": concurrency,
           "timeout": timeout}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve())], input=json.dumps(job), text=True,
                          capture_output=True, check=False, timeout=timeout + 60 + n_requests * timeout / concurrency)
    if done.returncode != 0:
        raise RuntimeError(f"The load client failed (exit {done.returncode}): {done.stderr.strip()[-800:]}")
    result = json.loads(done.stdout)
    return result["latencies"], int(result["errors"]), float(result["wall"])


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response; ``(status, keep_alive)``."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, chunked, keep_alive = 0, False, True
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding":
            chunked = "chunked" in value
        elif name == "connection":
            keep_alive = value != "close"
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)  # the chunk and its CRLF
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status, keep_alive


async def _connection(job: dict, own: list[bytes], counter: list[int], latencies: list[float], errors: list[int]
                      ) -> None:
    """One client: keep a connection open and send requests until ``job["n"]`` have been taken."""
    reader = writer = None
    timeout = job["timeout"]
    while counter[0] < job["n"]:
        k = counter[0]
        counter[0] += 1
        start = time.perf_counter()
        ok = False
        try:
            if writer is None:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(job["host"], job["port"]), timeout)
            writer.write(own[k % len(own)])
            status, keep_alive = await asyncio.wait_for(_read_response(reader), timeout)
            ok = status == 200
            if not keep_alive:
                writer.close()
                reader = writer = None
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                IndexError):
            if writer is not None:
                writer.close()
            reader = writer = None
        latencies.append(time.perf_counter() - start)
        errors[0] += not ok
    if writer is not None:
        writer.close()


async def _run(job: dict) -> dict:
    requests = [[r.encode("latin-1") for r in per_key] for per_key in job["requests"]]
    counter, latencies, errors = [0], [], [0]
    start = time.perf_counter()
    await asyncio.gather(*(_connection(job, requests[i % len(requests)], counter, latencies, errors)
                           for i in range(job["concurrency"])))
    return {"latencies": latencies, "errors": errors[0], "wall": time.perf_counter() - start}


def _main() -> int:
    job = json.loads(sys.stdin.read())
    try:
        import uvloop  # the server's event loop too, when installed
    except ImportError:
        result = asyncio.run(_run(job))
    else:
        result = uvloop.run(_run(job)) if hasattr(uvloop, "run") else asyncio.run(_run(job))
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
