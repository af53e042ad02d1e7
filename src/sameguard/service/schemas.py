"""Request and response bodies of the HTTP API (pydantic v2 models, also the OpenAPI schemas)."""

from __future__ import annotations

import base64
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["PredictJSON", "predict_json_schema", "PredictResponse", "AlarmNotice", "AlarmedError", "ClientAlarm", "ClearedAlarm", "ChallengeOut", "ChallengeResponse", "RedeemRequest", "ModelInfo",
           "ErrorResponse", "PowInfo", "Health"]


class PredictJSON(BaseModel):
    """A batch of images as JSON: either ``instances`` or ``b64`` + ``shape``.

    Images are ``(N, C, H, W)`` float32 in ``[-1, 1]`` (``x = 2 * pixel / 255 - 1``).
    """

    # No static examples: a valid one depends on the served model's image shape, so the app adds
    # them to its OpenAPI document (:func:`predict_json_schema`).
    model_config = ConfigDict(extra="forbid")

    instances: list[Any] | None = Field(None, description="nested array of shape (N, C, H, W), numbers in [-1, 1]")
    b64: str | None = Field(None, description="base64 of the little-endian float32 values in C order")
    shape: list[int] | None = Field(None, description="(N, C, H, W) of the b64 data")
    dtype: Literal["float32"] = "float32"
    output: Literal["probabilities", "labels"] | None = Field(
        None, description="ask for labels only (a probabilities service can answer labels, not the reverse)")

    @model_validator(mode="after")
    def _one_encoding(self) -> PredictJSON:
        if (self.instances is None) == (self.b64 is None):
            raise ValueError("send exactly one of 'instances' (a nested array) or 'b64' (base64 float32 with 'shape')")
        if self.b64 is not None and (self.shape is None or len(self.shape) != 4 or any(s < 1 for s in self.shape)):
            raise ValueError("'b64' needs 'shape': four positive integers (N, C, H, W)")
        return self


def predict_json_schema(image_shape: tuple[int, ...] | list[int], max_batch: int | None = None) -> dict[str, Any]:
    """The JSON schema of :class:`PredictJSON` for the OpenAPI document, for a model of ``image_shape``
    ``(C, H, W)``: ``instances`` is an ``(N, C, H, W)`` array of numbers in ``[-1, 1]``, ``shape`` is
    ``[N, C, H, W]`` (``1 <= N <= max_batch``), and two examples that the model accepts (one image of
    zeros, as ``instances`` and as ``b64``). Client generators and fuzzers get bodies the service can answer."""
    c, h, w = (int(v) for v in image_shape)
    n_max = {} if max_batch is None else {"maxItems": int(max_batch)}
    schema = PredictJSON.model_json_schema(ref_template="#/components/schemas/{model}")
    pixel = {"type": "number", "minimum": -1.0, "maximum": 1.0}
    row = {"type": "array", "items": pixel, "minItems": w, "maxItems": w}
    plane = {"type": "array", "items": row, "minItems": h, "maxItems": h}
    image = {"type": "array", "items": plane, "minItems": c, "maxItems": c}
    props = schema["properties"]
    props["instances"] = {"type": "array", "items": image, "minItems": 1, **n_max,
                          "description": props["instances"].get("description", "")}
    props["b64"] = {"type": "string", "pattern": "^[A-Za-z0-9+/]*={0,2}$",
                    "description": props["b64"].get("description", "")}
    batch = {"type": "integer", "minimum": 1, **({} if max_batch is None else {"maximum": int(max_batch)})}
    props["shape"] = {"type": "array", "prefixItems": [batch] + [{"const": v} for v in (c, h, w)], "minItems": 4,
                      "maxItems": 4, "description": props["shape"].get("description", "")}
    # Exactly one encoding (the model's validator): a nested array, or base64 with its shape.
    schema["oneOf"] = [{"required": ["instances"], "not": {"required": ["b64"]}},
                       {"required": ["b64", "shape"], "not": {"required": ["instances"]}}]
    zeros = base64.b64encode(bytes(4 * c * h * w)).decode("ascii")
    schema["examples"] = [{"instances": [[[[0.0] * w for _ in range(h)] for _ in range(c)]]},
                          {"b64": zeros, "shape": [1, c, h, w], "dtype": "float32"}]
    return schema


class AlarmNotice(BaseModel):
    """Why a client's queries are refused: its per-client alarm (with the reject policy only)."""

    queries_at_alarm: int | None = Field(description="the client's query count when its evidence reached 1/delta")
    evidence_log10: float | None = Field(description="log10 of the client's evidence at the alarm")
    threshold_log10: float = Field(description="log10(1/delta)")
    alarm_time: float | None = Field(description="UNIX seconds of the alarm")


class PredictResponse(BaseModel):
    """Answers of a batch: one entry per image, ``null`` where the query was refused."""

    request_id: str
    output: Literal["probabilities", "labels"]
    predictions: list[list[float] | int | None]
    refused: list[int] = Field(description="positions of the refused images")
    alarm: AlarmNotice | None = Field(None, description="present when images were refused because this API key "
                                                        "was alarmed during the batch (reject policy)")


class AlarmedError(BaseModel):
    """HTTP 403: every image was refused because this API key is alarmed as a model-extraction attacker."""

    error: Literal["client_alarmed"] = "client_alarmed"
    detail: str
    request_id: str | None = None
    alarm: AlarmNotice


class ClientAlarm(BaseModel):
    """One alarmed client (``GET /v1/admin/alarms``)."""

    client: str
    queries: int
    queries_at_alarm: int | None
    alarm_time: float | None
    evidence_log10: float


class ClearedAlarm(BaseModel):
    """``POST /v1/admin/clients/{client}/clear-alarm``: the client's evidence before the clearing."""

    client: str
    was_alarmed: bool
    queries: int
    evidence_log10: float


class ChallengeOut(BaseModel):
    """A proof-of-work challenge: find ``nonce`` with ``SHA256(challenge + ':' + nonce)`` starting with ``bits`` zero bits."""

    id: str
    bits: int
    issued_at: float
    expires_at: int
    resource: str
    challenge: str
    signature: str
    scheme: str
    hash: str
    rule: str


class ChallengeResponse(BaseModel):
    """HTTP 202: the answers are held until the challenge is solved and redeemed at ``/v1/pow/redeem``."""

    request_id: str
    challenge: ChallengeOut
    redeem: str = "/v1/pow/redeem"


class RedeemRequest(BaseModel):
    """A solved challenge."""

    model_config = ConfigDict(extra="forbid")

    # Printable ASCII only: a non-ASCII signature made hmac.compare_digest raise TypeError, and Unicode
    # digits (which the challenge's ``\d`` matches) its ASCII signing raise UnicodeEncodeError: both 500s.
    challenge: str = Field(max_length=256, pattern=r"^[\x20-\x7e]*$", description="the challenge, as issued")
    signature: str = Field(max_length=128, pattern=r"^[\x20-\x7e]*$",
                           description="the challenge's HMAC-SHA256 as sent with it (hex)")
    nonce: str = Field(max_length=64)


class ModelInfo(BaseModel):
    """What the service serves."""

    image_shape: list[int]
    num_classes: int
    classes: list[str] | None
    output: Literal["probabilities", "labels"]
    policy: str
    max_batch: int
    max_request_bytes: int
    normalisation: str = "float32 (N, C, H, W) in [-1, 1]: x = 2 * pixel / 255 - 1"
    versions: dict[str, Any]
    alarms: dict[str, Any] | None = Field(None, description="per-client alarms: delta, scorers, mode (null: none)")


class PowInfo(BaseModel):
    """How proof-of-work is priced."""

    enabled: bool
    scheme: str
    hash: str
    ttl_s: float
    calibration: dict[str, Any] | None


class Health(BaseModel):
    status: Literal["ok"]
    policy: str
    versions: dict[str, Any]
    alarms: dict[str, Any] | None = None


class ErrorResponse(BaseModel):
    """An error: ``detail`` says what was wrong."""

    detail: str
    request_id: str | None = None
