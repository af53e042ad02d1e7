"""The light load generator of ``bench-service``, against a tiny live server on loopback."""

from __future__ import annotations

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from sameguard.bench.load_client import build_request, time_requests
from sameguard.service import ServerThread


def test_build_request_is_the_exact_keep_alive_post():
    assert build_request("127.0.0.1", 8000, "/v1/predict", {"X-API-Key": "k"}, '{"a": 1}') == (
        b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nContent-Length: 8\r\nX-API-Key: k\r\n\r\n"
        b'{"a": 1}')


@pytest.mark.parametrize("headers", [{"Content-Length": "3"}, {"Connection": "close"}, {"X-A": "b\r\nX-B: c"}])
def test_build_request_refuses_headers_it_sets_itself_or_that_break_lines(headers):
    with pytest.raises(ValueError):
        build_request("h", 1, "/", headers, "")


def _app() -> Starlette:
    """``/v1/predict``: 200 with the body's length for key ``good``, 403 otherwise; ``/chunked``: a chunked
    200; ``/close``: 200 with ``Connection: close``."""
    seen = {"requests": 0}

    async def predict(request: Request) -> JSONResponse:
        seen["requests"] += 1
        body = await request.body()
        if request.headers.get("x-api-key") != "good":
            return JSONResponse({"detail": "bad key"}, status_code=403)
        return JSONResponse({"length": len(body)})

    async def chunked(request: Request) -> StreamingResponse:
        await request.body()

        async def parts():
            for part in (b"ab", b"cde", b"f"):
                yield part
        return StreamingResponse(parts())

    async def close(request: Request) -> PlainTextResponse:
        await request.body()
        return PlainTextResponse("bye", headers={"Connection": "close"})

    app = Starlette(routes=[Route("/v1/predict", predict, methods=["POST"]), Route("/chunked", chunked, methods=["POST"]),
                            Route("/close", close, methods=["POST"])])
    app.state.seen = seen
    return app


def test_time_requests_counts_answers_and_error_statuses():
    app = _app()
    with ServerThread(app) as server:
        latencies, errors, wall = time_requests(server.url, [{"X-API-Key": "good"}], ['{"x": 1}', "{}"], 12, 3)
        assert (len(latencies), errors) == (12, 0)
        assert all(0 < t <= wall for t in latencies)
        latencies, errors, _ = time_requests(server.url, [{"X-API-Key": "bad"}], ["{}"], 5, 2)
        assert (len(latencies), errors) == (5, 5)
    assert app.state.seen["requests"] == 17  # every request reached the server once


def test_time_requests_reads_chunked_and_closing_responses():
    with ServerThread(_app()) as server:
        for path in ("/chunked", "/close"):
            latencies, errors, _ = time_requests(server.url, [{}], ["{}"], 6, 2, path=path)
            assert (len(latencies), errors) == (6, 0), path


def test_time_requests_counts_refused_connections_and_checks_its_arguments():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    latencies, errors, _ = time_requests(f"http://127.0.0.1:{port}", [{}], ["{}"], 4, 2)
    assert (len(latencies), errors) == (4, 4)
    for args in (("http://127.0.0.1:1", [{}], ["{}"], 0, 1), ("http://127.0.0.1:1", [], ["{}"], 1, 1),
                 ("https://127.0.0.1:1", [{}], ["{}"], 1, 1), ("http://127.0.0.1", [{}], ["{}"], 1, 1)):
        with pytest.raises(ValueError):
            time_requests(*args)
