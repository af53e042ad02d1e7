"""The proof-of-work puzzle: HashCash with SHA-256, as pure functions.

Dziedzic, Kaleem, Lu and Papernot, "Increasing the Cost of Model Extraction with Calibrated
Proof of Work", ICLR 2022 (arXiv 2201.09243). Reference implementation:
cleverhans-lab/model-extraction-iclr (``pow/hashcash.py``), with SHA-256 instead of SHA-1.

A challenge is a string (the service's is ``"sg-pow-1:<bits>:<expires>:<id>:<client tag>:<resource>"``,
see :mod:`sameguard.service.challenges`); a solution is a nonce, 1-64 characters of
``[A-Za-z0-9_-]``, such that ``SHA256(challenge + ":" + nonce)`` starts with ``bits`` zero bits.
Finding one takes about ``2^bits`` hashes (:func:`solve`); checking it takes one
(:func:`verify_solution`). A batch of queries pays one puzzle worth the sum of their works
(:func:`batch_bits`).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence

import torch

from ..validation import check_int, check_optional_int

__all__ = [
    "SCHEME",
    "MAX_BITS",
    "leading_zero_bits",
    "pow_digest",
    "verify_solution",
    "solve",
    "batch_bits",
    "expected_hashes",
]

#: The name of the puzzle scheme, the first field of every challenge string.
SCHEME = "sg-pow-1"
#: The hardest puzzle there is (expected work ``2^64`` hashes).
MAX_BITS = 64
#: Nonces are short printable tokens; anything else is refused before hashing.
NONCE_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


def leading_zero_bits(digest: bytes) -> int:
    """Number of leading zero bits of ``digest`` (0 to ``8 * len(digest)``)."""
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def pow_digest(challenge: str, nonce: str) -> bytes:
    """``SHA256(challenge + ":" + nonce)``, the hash a solution is judged by."""
    return hashlib.sha256(f"{challenge}:{nonce}".encode("ascii")).digest()


def verify_solution(challenge: str, bits: int, nonce: str) -> bool:
    """Whether ``nonce`` solves ``challenge`` at ``bits`` difficulty: exactly one SHA-256.

    A malformed nonce (not 1-64 characters of ``[A-Za-z0-9_-]``) is never a solution.
    """
    if not isinstance(nonce, str) or not NONCE_RE.match(nonce):
        return False
    return leading_zero_bits(pow_digest(challenge, nonce)) >= bits


def solve(challenge: str, bits: int, *, max_attempts: int | None = None, start: int = 0) -> str:
    """Find a nonce for ``challenge`` at ``bits`` difficulty by brute force (about ``2^bits`` hashes).

    Args:
        challenge: the challenge string.
        bits: leading zero bits wanted, ``0 <= bits <= 64``.
        max_attempts: give up after this many hashes (``None``: no limit).
        start: first counter value (to split the search between workers).

    Returns:
        The nonce, the decimal counter as a string.

    Raises:
        ValueError: bad ``bits``, or no solution within ``max_attempts``.
    """
    bits = check_int(bits, "bits", minimum=0, maximum=MAX_BITS)
    max_attempts = check_optional_int(max_attempts, "max_attempts", minimum=0)
    start = check_int(start, "start", minimum=0)
    prefix = hashlib.sha256(f"{challenge}:".encode("ascii"))
    shift = 256 - bits
    i = start
    stop = None if max_attempts is None else start + max_attempts
    while stop is None or i < stop:
        h = prefix.copy()
        nonce = str(i)
        h.update(nonce.encode("ascii"))
        if int.from_bytes(h.digest(), "big") >> shift == 0:
            return nonce
        i += 1
    raise ValueError(f"No solution at {bits} bits within {max_attempts} attempts.")


def batch_bits(bits: Sequence[int] | torch.Tensor, cap: int = MAX_BITS) -> int:
    """Difficulty of one puzzle worth the summed work of several: ``ceil(log2(sum_i 2^bits_i))``, at most ``cap``.

    ``cap`` is the most one request (one puzzle) may cost: the proof-of-work action's ``max_bits``
    applies to the batch, not only to each image (issue 12: a batch of 4 images at 16 bits asked 18).
    """
    values = [int(b) for b in (bits.tolist() if isinstance(bits, torch.Tensor) else bits)]
    if not values:
        return 0
    top = max(values)
    total = sum(2.0 ** (b - top) for b in values)  # scaled to avoid overflow
    return min(math.ceil(top + math.log2(total) - 1e-12), int(cap), MAX_BITS)


def expected_hashes(bits: int | torch.Tensor) -> float | torch.Tensor:
    """Expected number of SHA-256 evaluations to solve a ``bits``-bit puzzle: ``2^bits``."""
    if isinstance(bits, torch.Tensor):
        return torch.pow(2.0, bits.to(torch.float64))
    return float(2 ** int(bits))
