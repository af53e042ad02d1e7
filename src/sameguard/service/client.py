"""A Python client of the service that is itself a :class:`~sameguard.prediction_api.PredictionAPI`.

:class:`SameguardClient` sends batches to ``POST /v1/predict`` (base64 float32 by default, or
JSON arrays), solves proof-of-work challenges on its own (:func:`~sameguard.actions.solve`) and
redeems them, and answers like any in-process API, so every attack in :mod:`sameguard.attacks`
runs against the live service unchanged::

    api = SameguardClient("http://127.0.0.1:8000", api_key)
    result = KnockoffNets(proxy).run(api, budget=1000, victim=victim, test_data=test)

The identity of the caller is the API key: the ``client`` argument of :meth:`query` only names a
local counter (what :meth:`queries_used` reports). Refused images come back as ``null`` from the
service; the client answers them with the uniform vector ``1/K`` (or a label drawn at random in
label mode) -- the same as the in-process guard -- or raises with ``on_refused="raise"``.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from typing import Any, Literal

import httpx
import numpy as np
import torch

from ..actions import solve
from ..api import SameguardError
from ..validation import check_images

logger = logging.getLogger(__name__)

__all__ = ["SameguardClient", "ServiceError", "RefusedError"]


class ServiceError(SameguardError, RuntimeError):
    """The service answered with an error status.

    Attributes:
        status: the HTTP status code.
        detail: the service's explanation.
    """

    def __init__(self, status: int, detail: str) -> None:
        self.status, self.detail = int(status), str(detail)
        super().__init__(f"The sameguard service answered {status}: {detail}")


class RefusedError(SameguardError, RuntimeError):
    """Some images of a batch were refused (``on_refused="raise"``); ``refused`` lists their positions."""

    def __init__(self, refused: list[int], answers: torch.Tensor) -> None:
        self.refused, self.answers = refused, answers
        super().__init__(f"The service refused {len(refused)} of {len(answers)} images.")


class SameguardClient:
    """The service as a :class:`~sameguard.prediction_api.PredictionAPI`.

    Args:
        base_url: e.g. ``"http://127.0.0.1:8000"``.
        api_key: a key from ``sameguard keys create``.
        output: ask for ``"probabilities"`` or ``"labels"``; default: what the service serves.
        encoding: ``"b64"`` (default, compact) or ``"json"`` (nested arrays).
        batch_size: images per request (default: the service's ``max_batch``).
        solve_pow: solve proof-of-work challenges automatically (default True).
        max_pow_bits: refuse (raise) challenges harder than this instead of solving them.
        on_refused: ``"uniform"`` (default) or ``"raise"`` (:class:`RefusedError`). A request
            refused because the key is alarmed (403 ``client_alarmed``) counts as every image of
            it refused; the service's ``alarm`` object is kept in :attr:`alarm`.
        max_retries: retries of a rate-limited (429) request, waiting ``Retry-After`` each time.
        timeout: seconds per HTTP request.
        seed: seeds the random labels given to refused images in label mode.
        transport: an ``httpx`` transport (tests).

    Thread-safe: ``httpx.Client`` is, and the counters are locked.
    """

    def __init__(self, base_url: str, api_key: str, *, output: Literal["probabilities", "labels"] | None = None,
                 encoding: Literal["b64", "json"] = "b64", batch_size: int | None = None, solve_pow: bool = True,
                 max_pow_bits: int = 28, on_refused: Literal["uniform", "raise"] = "uniform", max_retries: int = 5,
                 timeout: float = 60.0, seed: int = 0, transport: httpx.BaseTransport | None = None) -> None:
        if encoding not in ("b64", "json"):
            raise ValueError(f"encoding must be 'b64' or 'json', got {encoding!r}.")
        if on_refused not in ("uniform", "raise"):
            raise ValueError(f"on_refused must be 'uniform' or 'raise', got {on_refused!r}.")
        if not isinstance(api_key, str) or not api_key:
            raise ValueError("api_key must be a non-empty string (from 'sameguard keys create').")
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers={"X-API-Key": api_key}, timeout=timeout,
                                  transport=transport)
        self.encoding = encoding
        self.solve_pow = bool(solve_pow)
        self.max_pow_bits = int(max_pow_bits)
        self.on_refused = on_refused
        self.max_retries = int(max_retries)
        info = self._get("/v1/model")
        self.image_shape: tuple[int, int, int] = tuple(int(s) for s in info["image_shape"])  # type: ignore[assignment]
        self.num_classes = int(info["num_classes"])
        self.classes = info.get("classes")
        self.service_output: str = info["output"]
        if output is not None and output not in ("probabilities", "labels"):
            raise ValueError(f"output must be 'probabilities' or 'labels', got {output!r}.")
        self.output: Literal["probabilities", "labels"] = output or self.service_output  # type: ignore[assignment]
        self.batch_size = int(batch_size or info["max_batch"])
        self.policy = info.get("policy")
        self._used: dict[str, int] = {}
        self._lock = threading.Lock()
        self._generator = torch.Generator().manual_seed(seed)
        self.pow_solved = 0
        self.pow_hashes = 0
        self.pow_seconds = 0.0
        self.alarm: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return (f"SameguardClient({self.base_url!r}, image_shape={self.image_shape}, num_classes={self.num_classes}, "
                f"output={self.output!r})")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SameguardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- HTTP ----------------------------------------------------------------------------------
    @staticmethod
    def _detail(response: httpx.Response) -> str:
        try:
            return str(response.json().get("detail", response.text))
        except ValueError:
            return response.text

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.max_retries + 1):
            response = self._http.request(method, path, **kwargs)
            if response.status_code != 429 or attempt == self.max_retries:
                return response
            wait = float(response.headers.get("Retry-After", "1"))
            logger.info("Rate limited; retrying in %.1f s", wait)
            time.sleep(min(wait, 60.0))
        raise AssertionError("unreachable")  # pragma: no cover

    def _get(self, path: str) -> dict[str, Any]:
        response = self._request("GET", path)
        if response.status_code != 200:
            raise ServiceError(response.status_code, self._detail(response))
        return response.json()

    def _payload(self, x: torch.Tensor) -> dict[str, Any]:
        body: dict[str, Any] = {"output": self.output}
        if self.encoding == "b64":
            data = x.detach().cpu().contiguous().numpy().astype("<f4", copy=False).tobytes()
            body.update(b64=base64.b64encode(data).decode("ascii"), shape=list(x.shape), dtype="float32")
        else:
            body["instances"] = x.detach().cpu().tolist()
        return body

    def predict_raw(self, x: torch.Tensor) -> dict[str, Any]:
        """Send one batch (at most ``batch_size`` images) and return the service's JSON answer, solving PoW."""
        response = self._request("POST", "/v1/predict", json=self._payload(x))
        if response.status_code == 202:
            challenge = response.json()["challenge"]
            if not self.solve_pow:
                raise ServiceError(202, f"A proof-of-work challenge of {challenge['bits']} bits is due and "
                                        "solve_pow is off.")
            if challenge["bits"] > self.max_pow_bits:
                raise ServiceError(202, f"The proof-of-work challenge asks {challenge['bits']} bits, more than "
                                        f"max_pow_bits={self.max_pow_bits}.")
            start = time.perf_counter()
            nonce = solve(challenge["challenge"], int(challenge["bits"]))
            with self._lock:
                self.pow_solved += 1
                self.pow_hashes += int(nonce) + 1
                self.pow_seconds += time.perf_counter() - start
            response = self._request("POST", "/v1/pow/redeem", json={
                "challenge": challenge["challenge"], "signature": challenge["signature"], "nonce": nonce})
        alarmed = self._alarmed_answer(response, len(x))
        if alarmed is not None:
            return alarmed
        if response.status_code != 200:
            raise ServiceError(response.status_code, self._detail(response))
        body = response.json()
        if body.get("alarm") is not None:
            self.alarm = body["alarm"]
        return body

    def _alarmed_answer(self, response: httpx.Response, n: int) -> dict[str, Any] | None:
        """A 403 ``client_alarmed`` answer as a body with every image refused (``None`` for any other answer)."""
        if response.status_code != 403:
            return None
        try:
            body = response.json()
        except ValueError:
            return None
        if not isinstance(body, dict) or body.get("error") != "client_alarmed":
            return None
        self.alarm = body.get("alarm")
        logger.warning("%s", body.get("detail"))
        return {"request_id": body.get("request_id"), "output": self.output, "predictions": [None] * n,
                "refused": list(range(n)), "alarm": self.alarm}

    # -- the PredictionAPI ---------------------------------------------------------------------
    def query(self, x: torch.Tensor, client: str = "anonymous") -> torch.Tensor:
        """Answer ``x`` ``(N, C, H, W)`` in ``[-1, 1]`` through the service.

        Returns:
            ``(N, K)`` float32 probabilities, or ``(N,)`` int64 labels with ``output="labels"``.

        Raises:
            ValueError: an invalid batch (checked before anything is sent).
            ServiceError: the service refused the request (status and reason attached).
            RefusedError: ``on_refused="raise"`` and some images were refused.
        """
        if not isinstance(client, str) or not client:
            raise ValueError(f"client must be a non-empty string, got {client!r}.")
        x = check_images(x, self.image_shape)
        parts, refused_all = [], []
        for start in range(0, len(x), self.batch_size):
            answer = self.predict_raw(x[start:start + self.batch_size])
            preds = answer["predictions"]
            refused = [start + i for i in answer["refused"]]
            refused_all += refused
            if self.output == "labels":
                labels = torch.tensor([-1 if p is None else int(p) for p in preds], dtype=torch.int64)
                parts.append(labels)
            else:
                rows = np.array([[1.0 / self.num_classes] * self.num_classes if p is None else p for p in preds],
                                dtype=np.float32)
                parts.append(torch.from_numpy(rows))
        out = torch.cat(parts)
        with self._lock:
            self._used[client] = self._used.get(client, 0) + len(x)
        if refused_all:
            if self.on_refused == "raise":
                raise RefusedError(refused_all, out)
            if self.output == "labels":
                with self._lock:
                    out[refused_all] = torch.randint(0, self.num_classes, (len(refused_all),),
                                                     generator=self._generator)
        return out

    __call__ = query

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, K)`` probabilities (labels become one-hot vectors)."""
        out = self.query(x)
        if out.dim() == 1:
            return torch.nn.functional.one_hot(out.clamp_min(0), self.num_classes).float()
        return out

    def queries_used(self, client: str) -> int:
        """Images this client object has had answered under the local name ``client``."""
        with self._lock:
            return self._used.get(client, 0)

    def remaining(self, client: str) -> int | None:
        """``None``: the service enforces rate limits, not budgets."""
        return None

    def health(self) -> dict[str, Any]:
        return self._get("/healthz")
