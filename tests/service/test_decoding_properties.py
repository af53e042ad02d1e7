"""Property tests of the request decoders (Hypothesis): whatever the bytes, nothing but the documented 4xx.

Every decoder either returns a batch or raises an :class:`~fastapi.HTTPException` with status 400
(malformed JSON), 413 (too many images) or 422 (a body or images that do not validate); the
images it returns either pass :func:`~sameguard.validation.check_images` or fail it with a
``ValueError`` (the service's 422). Nothing else may escape: an unexpected exception is a 500.
The examples are derandomized, so the run is the same every time; ``make fuzz`` runs more of them.
"""

from __future__ import annotations

import base64
import io
import json
import os

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("hypothesis")
from fastapi import HTTPException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sameguard.service.decoding import decode_b64, decode_instances, decode_json, decode_png, parse_predict_json
from sameguard.validation import check_images

SHAPE = (1, 4, 3)
MAX_BATCH = 4
DOCUMENTED = {400, 413, 422}
#: 200 examples per property in the test suite; ``make fuzz`` (``SAMEGUARD_FUZZ_EXAMPLES``) runs more.
EXAMPLES = max(200, int(os.environ.get("SAMEGUARD_FUZZ_EXAMPLES", "0") or 0))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _only_documented(call, *args):
    """Run a decoder; an HTTPException must carry a documented status and a non-empty detail."""
    try:
        return call(*args)
    except HTTPException as exc:
        assert exc.status_code in DOCUMENTED, (exc.status_code, exc.detail)
        assert isinstance(exc.detail, str) and exc.detail.strip()
        return None


def _as_served(raw: bytes):
    """``decode_json`` then the image checks, as ``read_batch`` does (a ValueError there is the 422)."""
    out = _only_documented(decode_json, raw, SHAPE, MAX_BATCH)
    if out is not None:
        x, output = out
        assert output in (None, "probabilities", "labels")
        try:
            x = check_images(x, SHAPE, name="images")
        except ValueError:
            return
        assert tuple(x.shape[1:]) == SHAPE and 1 <= x.shape[0] <= MAX_BATCH


numbers = st.one_of(st.integers(-10**40, 10**40), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                    st.none(), st.text(max_size=3))
json_values = st.recursive(numbers, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5),
                                                                                                 inner, max_size=3),
                           max_leaves=40)
images = st.lists(st.lists(st.lists(st.lists(st.floats(-1.5, 1.5) | st.integers(-2, 2) | st.booleans(),
                                             min_size=3, max_size=3), min_size=4, max_size=4),
                           min_size=1, max_size=1), min_size=0, max_size=5)
bodies = st.fixed_dictionaries({}, optional={
    "instances": st.one_of(images, json_values),
    "b64": st.one_of(st.text(max_size=80), st.binary(max_size=80).map(lambda b: base64.b64encode(b).decode())),
    "shape": st.one_of(st.lists(st.integers(-3, 10**35), max_size=5), json_values),
    "dtype": st.sampled_from(["float32", "float64", 1]),
    "output": st.sampled_from(["probabilities", "labels", "logits", None, 3]),
    "extra": json_values,
})


@FUZZ
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_get_a_documented_4xx(raw):
    _only_documented(parse_predict_json, raw)
    _as_served(raw)


@FUZZ
@given(bodies)
def test_any_json_body_decodes_or_gets_a_documented_4xx(body):
    _as_served(json.dumps(body, allow_nan=True).encode())


@FUZZ
@given(st.text(max_size=400))
def test_any_text_with_big_numbers_decodes_or_gets_a_documented_4xx(text):
    for raw in (text, '{"instances": [[[[%s]]]]}' % text, '{"b64": "", "shape": [1, 1, 4, %s]}' % text):
        _as_served(raw.encode("utf-8", "surrogatepass"))
    _as_served(('{"instances": %s}' % ("9" * (len(text) * 20 + 1))).encode())


LONG_NUMBER_BODIES = ['{"instances": %s}', '{"instances": [[[[%s]]]]}', '{"instances": [[[[0.5, %s]]]]}',
                      '{"b64": "", "shape": [1, 1, 4, %s]}', '{"b64": "", "shape": [%s, 1, 4, 3]}',
                      '{"instances": [[[[0.0]]]], "output": %s}', '{"instances": [[[[0.0]]]], "x": {"y": [%s]}}']


@FUZZ
@given(st.integers(1, 6000), st.sampled_from(["", "-"]), st.sampled_from(["", ".5", "e3", ".0e-2"]),
       st.sampled_from(LONG_NUMBER_BODIES))
def test_numbers_of_any_length_anywhere_get_a_documented_4xx(digits, sign, tail, template):
    """Python refuses to convert integer literals of more than 4300 digits (a ValueError): still a 4xx."""
    _as_served((template % f"{sign}{'7' * digits}{tail}").encode())


@FUZZ
@given(json_values)
def test_decode_instances_gets_only_documented_errors(instances):
    _only_documented(decode_instances, instances, SHAPE, MAX_BATCH)


@FUZZ
@given(st.text(max_size=60), st.lists(st.integers(-5, 10**30), min_size=4, max_size=4))
def test_decode_b64_gets_only_documented_errors(b64, shape):
    if shape[0] < 1 or any(s < 1 for s in shape):
        return  # the request model refuses these before decode_b64 is called
    _only_documented(decode_b64, b64, shape, SHAPE, MAX_BATCH)


def _png(mode: str = "L", size: tuple[int, int] = (3, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color=7 if mode in ("L", "I;16", "1", "P") else (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


VALID_PNG = _png()


@FUZZ
@given(st.one_of(st.binary(max_size=200),
                 st.lists(st.tuples(st.integers(0, len(VALID_PNG) - 1), st.integers(0, 255)), min_size=1, max_size=8)
                 .map(lambda edits: bytes(_mutate(VALID_PNG, edits))),
                 st.sampled_from([_png("RGB"), _png("L", (4, 3)), _png("RGBA"), _png("I;16"), _png("1"), _png("P")])))
def test_decode_png_gets_only_documented_errors(data):
    out = _only_documented(decode_png, data, SHAPE)
    if out is not None:
        assert out.dtype == np.uint8 and out.shape == (4, 3)


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytearray:
    out = bytearray(data)
    for i, v in edits:
        out[i] = v
    return out
