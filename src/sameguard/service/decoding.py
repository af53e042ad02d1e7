"""Request bodies to image batches: JSON arrays, base64 float32, PNG uploads.

Every decoder returns ``(images, output)``: a float32 tensor ``(N, C, H, W)`` (range and NaN
are checked afterwards by :func:`~sameguard.validation.check_images`) and the requested output
(``"probabilities"``, ``"labels"`` or ``None`` for the service's default). Anything wrong raises
an :class:`~fastapi.HTTPException` whose detail says what: 400 malformed JSON (including an integer
literal longer than :data:`MAX_INT_DIGITS` digits) or multipart, 413 too many images (a body over the
size limit is answered 413 by the middleware), 415 an unsupported content type, 422 a body or images
that do not validate (``true``/``false`` among the numbers included). Nothing else escapes them
(``tests/service/test_decoding_properties.py`` checks it with Hypothesis).

* ``application/json`` ``{"instances": [...]}``: a nested ``(N, C, H, W)`` array of numbers.
* ``application/json`` ``{"b64": "...", "shape": [N, C, H, W]}``: little-endian float32, C order.
* ``multipart/form-data``: PNG files in the field ``images`` (the model's height and width,
  converted to its channels), optional text field ``output``.
"""

from __future__ import annotations

import base64
import binascii
import io
import itertools
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from fastapi import HTTPException, Request
from pydantic import ValidationError

from .errors import validation_message
from .middleware import BodyTooLarge
from .schemas import PredictJSON

__all__ = [
    "decode_request",
    "decode_json",
    "decode_b64",
    "decode_instances",
    "decode_multipart",
    "decode_png",
    "check_batch_size",
    "parse_predict_json",
]

#: Modes PNG uploads are converted to, by the model's channel count.
_PNG_MODES = {1: "L", 3: "RGB"}
_OUTPUTS = ("probabilities", "labels")
#: Longest integer literal accepted in a JSON body. No field needs more (shapes are small, pixels are
#: in [-1, 1]); Python's own limit (4300 digits) would otherwise surface as a ``ValueError``.
MAX_INT_DIGITS = 32


class _IntegerTooLong(ValueError):
    """An integer literal in the JSON body has more than :data:`MAX_INT_DIGITS` digits."""


def _parse_int(text: str) -> int:
    """``json.loads``'s ``parse_int``: refuse long literals before converting them (no echo of the number)."""
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _IntegerTooLong(len(text.lstrip("-")))
    return int(text)


def check_batch_size(n: int, max_batch: int) -> None:
    """413 when a batch has more than ``max_batch`` images."""
    if n > max_batch:
        raise HTTPException(413, f"The batch has {n} images; this service accepts at most {max_batch} per request.")


async def decode_request(request: Request, image_shape: Sequence[int], max_batch: int) -> tuple[torch.Tensor, str | None]:
    """Decode a prediction request by its content type (JSON or multipart); 415 for any other."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        return decode_json(await request.body(), image_shape, max_batch)
    if ctype == "multipart/form-data":
        return await decode_multipart(request, image_shape, max_batch)
    raise HTTPException(415, f"Unsupported content type {ctype or '(none)'!r}: send application/json or "
                             "multipart/form-data with PNG files in 'images'.")


def parse_predict_json(raw: bytes) -> PredictJSON:
    """The JSON body as :class:`~sameguard.service.schemas.PredictJSON` (400 malformed, 422 invalid)."""
    try:
        obj = json.loads(raw, parse_int=_parse_int)
    except RecursionError:
        raise HTTPException(400, "Malformed JSON in the request body: it is nested too deeply.") from None
    except json.JSONDecodeError as exc:
        raise HTTPException(400, f"Malformed JSON in the request body: {exc.msg} at line {exc.lineno} column "
                                 f"{exc.colno}.") from None
    except UnicodeDecodeError:
        raise HTTPException(400, "Malformed JSON in the request body: the body is not UTF-8.") from None
    except _IntegerTooLong as exc:
        raise HTTPException(400, f"Malformed JSON in the request body: an integer of {exc.args[0]} digits; at most "
                                 f"{MAX_INT_DIGITS} are accepted.") from None
    except ValueError:  # any other number the JSON parser cannot convert
        raise HTTPException(400, "Malformed JSON in the request body: a number cannot be converted.") from None
    try:
        return PredictJSON.model_validate(obj)
    except ValidationError as exc:
        raise HTTPException(422, validation_message(exc.errors())) from None


def decode_json(raw: bytes, image_shape: Sequence[int], max_batch: int) -> tuple[torch.Tensor, str | None]:
    """A JSON body (``instances`` or ``b64`` + ``shape``) to ``(images, output)``."""
    body = parse_predict_json(raw)
    if body.b64 is not None:
        array = decode_b64(body.b64, body.shape or [], image_shape, max_batch)
    else:
        array = decode_instances(body.instances, image_shape, max_batch)
    return torch.from_numpy(np.ascontiguousarray(array)), body.output


def decode_b64(b64: str, shape: Sequence[int], image_shape: Sequence[int], max_batch: int) -> np.ndarray:
    """Base64 of little-endian float32 values in C order, of ``shape`` ``(N, C, H, W)``, to a float32 array."""
    shape = tuple(int(s) for s in shape)
    check_batch_size(shape[0], max_batch)
    if shape[1:] != tuple(image_shape):
        raise HTTPException(422, f"shape must be (N, {', '.join(map(str, image_shape))}) for this model, got "
                                 f"{list(shape)}.")
    try:
        data = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, "b64 is not valid base64.") from None
    expected = math.prod(shape) * 4
    if len(data) != expected:
        raise HTTPException(422, f"b64 holds {len(data)} bytes but shape {list(shape)} of float32 needs {expected}.")
    return np.frombuffer(data, dtype="<f4").reshape(shape).astype(np.float32)


def decode_instances(instances: Any, image_shape: Sequence[int], max_batch: int) -> np.ndarray:
    """A nested array of numbers to a float32 array (422 when ragged or not numeric; shape checked later)."""
    wanted = f"(N, {', '.join(map(str, image_shape))})"
    try:
        array = np.asarray(instances)
    except (ValueError, TypeError):
        raise HTTPException(422, f"instances must be a rectangular nested array of numbers of shape {wanted}.") from None
    if array.dtype.kind not in "fiu" or array.dtype == object or _holds_bool(instances, array.ndim):
        raise HTTPException(422, f"instances must be a rectangular nested array of numbers of shape {wanted}; found "
                                 "non-numeric (e.g. true/false) or ragged values.")
    if array.ndim >= 1:
        check_batch_size(int(array.shape[0]), max_batch)
    with np.errstate(over="ignore", invalid="ignore"):  # a huge number becomes inf: refused as 422 afterwards
        return array.astype(np.float32)


def _holds_bool(instances: Any, ndim: int) -> bool:
    """Whether a rectangular nested list of ``ndim`` levels holds ``true``/``false`` (numpy reads them as 1/0)."""
    if ndim == 0:
        return isinstance(instances, bool)
    flat: Any = instances
    for _ in range(ndim - 1):
        flat = itertools.chain.from_iterable(flat)
    return any(type(v) is bool for v in flat)


async def decode_multipart(request: Request, image_shape: Sequence[int],
                           max_batch: int) -> tuple[torch.Tensor, str | None]:
    """PNG files in the form field ``images`` (and an optional ``output`` field) to ``(images, output)``."""
    from ..data.transforms import to_model_range

    try:
        form = await request.form(max_files=max_batch + 1, max_fields=16)
    except (HTTPException, BodyTooLarge):
        raise  # BodyTooLarge: the middleware answers 413 with the limit
    except Exception as exc:  # noqa: BLE001 - the multipart parser raises many kinds; all mean a bad body
        reason = str(getattr(exc, "detail", "") or exc) or type(exc).__name__
        if reason.startswith("Too many files"):
            raise HTTPException(413, f"The multipart body has more than {max_batch} files; this service accepts at "
                                     f"most {max_batch} images per request.") from None
        raise HTTPException(400, f"Malformed multipart body: {reason[:200]}") from None
    files = form.getlist("images")
    output = form.get("output")
    if output is not None and not isinstance(output, str):
        raise HTTPException(422, "The 'output' form field must be text: 'probabilities' or 'labels'.")
    if not files:
        raise HTTPException(422, "The multipart body has no 'images' field: upload one or more PNG files as 'images'.")
    check_batch_size(len(files), max_batch)
    c = image_shape[0]
    if c not in _PNG_MODES:
        raise HTTPException(422, f"PNG uploads are supported for 1- or 3-channel models, not {c} channels.")
    arrays = []
    for i, f in enumerate(files):
        if isinstance(f, str):
            raise HTTPException(422, f"'images' item {i} is a text field; upload PNG files.")
        arrays.append(decode_png(await f.read(), image_shape, name=f"'images' item {i} ({f.filename!r})"))
    if output is not None and output not in _OUTPUTS:
        raise HTTPException(422, f"output must be 'probabilities' or 'labels', got {output!r}.")
    return to_model_range(np.stack(arrays)), output


def decode_png(data: bytes, image_shape: Sequence[int], *, name: str = "the image") -> np.ndarray:
    """One PNG file to ``uint8`` pixels ``(H, W)`` (1 channel) or ``(H, W, 3)``, converted to the model's channels.

    Raises:
        HTTPException: 422 when it is not a readable PNG, another format, or of another size.
    """
    from PIL import Image, UnidentifiedImageError

    c, h, w = (int(s) for s in image_shape)
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "PNG":
                raise HTTPException(422, f"{name} is {img.format}, not PNG.")
            if img.size != (w, h):
                raise HTTPException(422, f"{name} is {img.size[0]}x{img.size[1]} pixels; the model expects {w}x{h}.")
            return np.asarray(img.convert(_PNG_MODES[c]), dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError):
        raise HTTPException(422, f"{name} is not a readable PNG image.") from None
