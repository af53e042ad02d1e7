"""Calibrated Proof-of-Work: make suspicious clients pay compute before they get an answer.

Dziedzic, Kaleem, Lu and Papernot, "Increasing the Cost of Model Extraction with Calibrated
Proof of Work", ICLR 2022 (arXiv 2201.09243). Reference implementation:
cleverhans-lab/model-extraction-iclr (``pow/proof_of_work.py``, ``pow/hashcash.py``).

**Puzzle** (HashCash-style, SHA-256 instead of the reference's SHA-1). The server issues a
challenge string ``"sg-pow-1:<bits>:<expires>:<id>:<client tag>:<resource>"`` signed with
HMAC-SHA256 under a server secret; the client searches for a nonce (a short ASCII string) such
that ``SHA256(challenge + ":" + nonce)`` starts with ``bits`` zero bits (expected work
``2^bits`` hashes); the server verifies with **one** hash (plus the HMAC). Challenges are also
stored server side: each can be redeemed **once** (a replay is refused), only by the client it was
issued to, and only before it expires.

**Difficulty from the score** (a deviation, documented). The paper prices a user by the
cumulative PATE privacy cost of its queries, calibrated on one legitimate user's trace, and maps
the time ``t = clip(base^diff, 0.1 s, 2948 s)`` to bits through a measured table. SAME gives a
per-query score instead, so here the score is mapped to bits directly, calibrated on benign
scores (the provider's held-out data):

    bits(s) = clip( ceil( b_benign + kappa * (s - a) / d ), b_min, b_max )

with ``a`` the ``quantile`` (default 0.99) of the benign scores, ``d = a - median`` their robust
spread, ``b_benign`` the most a benign query at or below that quantile pays (default 12 bits,
4096 hashes, a few milliseconds), ``kappa`` extra bits per spread above it (default 4, i.e.
16x more work per spread) and ``b_max`` the cap (default 26 bits). By construction at least
``quantile`` of the benign calibration queries cost ``<= b_benign`` bits, and the work grows
exponentially with how far a score lies above benign traffic. A batch of ``N`` queries is one
puzzle whose expected work is the sum of its queries' works:
``B = ceil(log2(sum_i 2^bits_i))`` (:func:`batch_bits`).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from ..api import NotCalibratedError, SameguardError
from .base import Action, ActionOutcome, check_batch

__all__ = [
    "SCHEME",
    "ProofOfWork",
    "Challenge",
    "ChallengeIssuer",
    "PowError",
    "ChallengeMalformedError",
    "ChallengeForgedError",
    "ChallengeExpiredError",
    "ChallengeReplayedError",
    "ChallengeUnknownError",
    "ChallengeClientMismatchError",
    "InvalidSolutionError",
    "TooManyChallengesError",
    "leading_zero_bits",
    "pow_digest",
    "verify_solution",
    "solve",
    "batch_bits",
    "expected_hashes",
]

SCHEME = "sg-pow-1"
#: Nonces are short printable tokens; anything else is refused before hashing.
_NONCE_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_CHALLENGE_RE = re.compile(
    r"^sg-pow-1:(?P<bits>\d{1,3}):(?P<expires>\d{1,12}):(?P<id>[0-9a-f]{32}):(?P<tag>[0-9a-f]{16}):(?P<resource>[0-9a-f]{0,64})$"
)
MAX_BITS = 64


# -- the puzzle ----------------------------------------------------------------------------------
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
    if not isinstance(nonce, str) or not _NONCE_RE.match(nonce):
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
    if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [0, {MAX_BITS}], got {bits!r}.")
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


def batch_bits(bits: Sequence[int] | torch.Tensor) -> int:
    """Difficulty of one puzzle worth the summed work of several: ``ceil(log2(sum_i 2^bits_i))``."""
    values = [int(b) for b in (bits.tolist() if isinstance(bits, torch.Tensor) else bits)]
    if not values:
        return 0
    top = max(values)
    total = sum(2.0 ** (b - top) for b in values)  # scaled to avoid overflow
    return min(int(math.ceil(top + math.log2(total) - 1e-12)), MAX_BITS)


def expected_hashes(bits: int | torch.Tensor) -> float | torch.Tensor:
    """Expected number of SHA-256 evaluations to solve a ``bits``-bit puzzle: ``2^bits``."""
    if isinstance(bits, torch.Tensor):
        return torch.pow(2.0, bits.to(torch.float64))
    return float(2 ** int(bits))


# -- the calibrated action -----------------------------------------------------------------------
class ProofOfWork(Action):
    """Calibrated Proof-of-Work (Dziedzic et al., ICLR 2022) with the difficulty set by the score.

    Args:
        benign_bits: bits paid by a query whose score is the benign ``quantile`` (default 12).
        bits_per_spread: extra bits per benign spread ``d = quantile - median`` above it
            (default 4).
        max_bits: the cap (default 26; the reference's largest timing, 2948 s, is 32 bits of
            SHA-1 in C).
        min_bits: the floor (default 0).
        quantile: which benign quantile is anchored to ``benign_bits`` (default 0.99).

    Answers are not changed; the outcome carries each query's ``work_bits`` and the server
    withholds the answer until the puzzle of the batch is solved. Call :meth:`calibrate` with
    benign scores before use.
    """

    name: ClassVar[str] = "pow"

    def __init__(self, *, benign_bits: int = 12, bits_per_spread: float = 4.0, max_bits: int = 26,
                 min_bits: int = 0, quantile: float = 0.99) -> None:
        for label, value in (("benign_bits", benign_bits), ("max_bits", max_bits), ("min_bits", min_bits)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_BITS:
                raise ValueError(f"{label} must be an integer number of bits in [0, {MAX_BITS}], got {value!r}.")
        if not min_bits <= benign_bits <= max_bits:
            raise ValueError(f"The bits must satisfy min_bits <= benign_bits <= max_bits, got {min_bits}, "
                             f"{benign_bits} and {max_bits}.")
        if isinstance(bits_per_spread, bool) or not isinstance(bits_per_spread, (int, float)) or not bits_per_spread > 0:
            raise ValueError(f"bits_per_spread must be a positive number, got {bits_per_spread!r}.")
        if not 0.5 < quantile < 1.0:
            raise ValueError(f"quantile must be in (0.5, 1), e.g. 0.99 for the benign p99; got {quantile!r}.")
        self.benign_bits = int(benign_bits)
        self.bits_per_spread = float(bits_per_spread)
        self.max_bits = int(max_bits)
        self.min_bits = int(min_bits)
        self.quantile = float(quantile)
        self.anchor_: float | None = None
        self.spread_: float | None = None
        self.calibration_: dict[str, float] | None = None

    def describe(self) -> dict[str, object]:
        return {"action": self.name, "benign_bits": self.benign_bits, "bits_per_spread": self.bits_per_spread,
                "max_bits": self.max_bits, "min_bits": self.min_bits, "quantile": self.quantile,
                "anchor": self.anchor_, "spread": self.spread_}

    def is_calibrated(self) -> bool:
        return self.anchor_ is not None and self.spread_ is not None

    def calibrate(self, benign_scores: torch.Tensor) -> ProofOfWork:
        """Anchor the bits map on benign scores ``(N,)`` (finite, ``N >= 2``); returns ``self``.

        Sets ``anchor_`` (the ``quantile`` of the scores), ``spread_`` (``anchor_ - median``, or a
        tiny positive number when the scores are all equal) and ``calibration_`` (what benign
        traffic pays: bits at the median and at the quantile, mean expected hashes per query).
        """
        s = torch.as_tensor(benign_scores, dtype=torch.float64).flatten()
        if s.numel() < 2:
            raise ValueError(f"Calibration needs at least 2 benign scores, got {s.numel()}.")
        if not torch.isfinite(s).all():
            raise ValueError("Benign calibration scores must be finite; found NaN or infinity.")
        anchor = float(torch.quantile(s, self.quantile, interpolation="higher"))
        spread = anchor - float(torch.quantile(s, 0.5))
        if not spread > 0:
            spread = max(float(s.std()), 1e-12 * max(1.0, abs(anchor)), 1e-300)
        self.anchor_, self.spread_ = anchor, spread
        bits = self.bits_for(s)
        self.calibration_ = {
            "n": float(s.numel()),
            "anchor": anchor,
            "spread": spread,
            "benign_bits_median": float(torch.quantile(bits.double(), 0.5)),
            "benign_bits_quantile": float(torch.quantile(bits.double(), self.quantile)),
            "benign_fraction_within_budget": float((bits <= self.benign_bits).double().mean()),
            "benign_mean_hashes": float(expected_hashes(bits).mean()),
        }
        return self

    def bits_for(self, scores: torch.Tensor) -> torch.Tensor:
        """``(N,)`` int64 difficulty of each query (the formula in the module docstring).

        NaN scores pay ``max_bits`` (fail closed).
        """
        if not self.is_calibrated():
            raise NotCalibratedError("This ProofOfWork is not calibrated: call calibrate(benign_scores) first, so "
                                     "that benign traffic pays at most benign_bits.")
        s = torch.as_tensor(scores, dtype=torch.float64).flatten()
        raw = self.benign_bits + self.bits_per_spread * (s - self.anchor_) / self.spread_
        raw = torch.where(torch.isnan(raw), torch.full_like(raw, float(self.max_bits)), raw)
        bits = torch.ceil(raw - 1e-9).clamp(self.min_bits, self.max_bits)
        return bits.to(torch.int64)

    def apply(self, x: torch.Tensor | None, probs: torch.Tensor, scores: torch.Tensor,
              threshold: float) -> ActionOutcome:
        probs, scores, threshold = check_batch(probs, scores, threshold)
        bits = self.bits_for(scores)
        n = probs.shape[0]
        return ActionOutcome(probabilities=probs, refused=torch.zeros(n, dtype=torch.bool), actions=("pow",) * n,
                             work_bits=bits, alpha=torch.zeros(n, dtype=torch.float32))


# -- challenges: issue, store, redeem once --------------------------------------------------------
class PowError(SameguardError, ValueError):
    """A proof-of-work redemption was refused; ``status`` is the HTTP status the service answers."""

    status: ClassVar[int] = 400


class ChallengeMalformedError(PowError):
    """The challenge string is not one this server issues."""

    status = 400


class ChallengeForgedError(PowError):
    """The challenge's HMAC signature does not match (tampered with or forged)."""

    status = 403


class ChallengeClientMismatchError(PowError):
    """The challenge was issued to another client."""

    status = 403


class InvalidSolutionError(PowError):
    """The nonce does not give the required leading zero bits."""

    status = 403


class ChallengeExpiredError(PowError):
    """The challenge is past its expiry time."""

    status = 410


class ChallengeReplayedError(PowError):
    """The challenge was already redeemed (single use)."""

    status = 409


class ChallengeUnknownError(PowError):
    """A correctly signed challenge this server does not hold (e.g. issued before a restart)."""

    status = 410


class TooManyChallengesError(PowError):
    """The client (or the server) has too many unsolved challenges outstanding."""

    status = 429


@dataclass(frozen=True)
class Challenge:
    """One issued puzzle.

    Attributes:
        id: 32 hex characters, random.
        client: the client it was issued to.
        bits: leading zero bits required.
        issued_at, expires_at: UNIX seconds (``expires_at`` is an integer).
        resource: hex digest of what is being paid for (e.g. the request's input digests).
        challenge: the string to solve, ``sg-pow-1:bits:expires:id:client-tag:resource``.
        signature: hex HMAC-SHA256 of ``challenge`` under the server's secret.
    """

    id: str
    client: str
    bits: int
    issued_at: float
    expires_at: int
    resource: str
    challenge: str
    signature: str

    def to_dict(self) -> dict[str, Any]:
        """The public fields sent to the client (the client name is left out)."""
        d = asdict(self)
        d.pop("client")
        d["scheme"] = SCHEME
        d["hash"] = "sha256"
        d["rule"] = "find nonce matching [A-Za-z0-9_-]{1,64} with SHA256(challenge + ':' + nonce) starting with bits zero bits"
        return d


def _client_tag(client: str) -> str:
    return hashlib.sha256(client.encode("utf-8")).hexdigest()[:16]


class ChallengeIssuer:
    """Issues HMAC-signed challenges, keeps them until redeemed or expired, redeems each once.

    Args:
        secret: HMAC key (at least 16 bytes); ``None`` draws 32 random bytes, so challenges do not
            survive a restart (they are short-lived anyway).
        ttl_s: seconds a challenge stays valid (default 120).
        max_pending: most unsolved challenges held in memory for all clients (default 10000).
        max_pending_per_client: most unsolved challenges per client (default 32).
        clock: a function returning UNIX seconds (tests pass a fake one).

    Thread-safe. State is in memory: run one worker process per issuer (the service's default),
    or share the store (e.g. Redis) in a multi-replica deployment.
    """

    def __init__(self, secret: bytes | None = None, *, ttl_s: float = 120.0, max_pending: int = 10_000,
                 max_pending_per_client: int = 32, clock: Callable[[], float] = time.time) -> None:
        if secret is not None and (not isinstance(secret, bytes) or len(secret) < 16):
            raise ValueError("secret must be bytes of length at least 16 (e.g. secrets.token_bytes(32)).")
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be a positive number of seconds, got {ttl_s!r}.")
        if max_pending < 1 or max_pending_per_client < 1:
            raise ValueError("max_pending and max_pending_per_client must be positive integers.")
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self.ttl_s = float(ttl_s)
        self.max_pending = int(max_pending)
        self.max_pending_per_client = int(max_pending_per_client)
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: OrderedDict[str, tuple[Challenge, Any]] = OrderedDict()
        self._per_client: dict[str, int] = {}
        self._redeemed: OrderedDict[str, int] = OrderedDict()  # id -> expires_at, to tell replays apart

    def _sign(self, text: str) -> str:
        return hmac.new(self._secret, text.encode("ascii"), hashlib.sha256).hexdigest()

    def _purge(self, now: float) -> None:
        """Drop expired challenges and expired replay records (lock held)."""
        for cid in [cid for cid, (c, _) in self._pending.items() if c.expires_at < now]:
            challenge, _ = self._pending.pop(cid)
            self._release(challenge.client)
        while self._redeemed and next(iter(self._redeemed.values())) < now:
            self._redeemed.popitem(last=False)

    def _release(self, client: str) -> None:
        left = self._per_client.get(client, 1) - 1
        if left <= 0:
            self._per_client.pop(client, None)
        else:
            self._per_client[client] = left

    @property
    def pending(self) -> int:
        """Number of challenges issued and not yet redeemed (expired ones may still count until purged)."""
        with self._lock:
            return len(self._pending)

    def issue(self, client: str, bits: int, payload: Any = None, resource: str = "") -> Challenge:
        """Create and store a challenge for ``client`` at ``bits``; ``payload`` is handed back on redemption.

        Raises:
            TooManyChallengesError: the client or the server holds too many unsolved challenges.
        """
        if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= MAX_BITS:
            raise ValueError(f"bits must be an integer in [0, {MAX_BITS}], got {bits!r}.")
        if not re.fullmatch(r"[0-9a-f]{0,64}", resource):
            raise ValueError("resource must be a lowercase hex digest of at most 64 characters.")
        now = self._clock()
        with self._lock:
            self._purge(now)
            if self._per_client.get(client, 0) >= self.max_pending_per_client:
                raise TooManyChallengesError(
                    f"Client has {self.max_pending_per_client} unsolved proof-of-work challenges outstanding; "
                    "redeem or let them expire before asking for more.")
            if len(self._pending) >= self.max_pending:
                raise TooManyChallengesError("The server holds too many unsolved proof-of-work challenges; retry later.")
            cid = secrets.token_hex(16)
            expires = int(math.ceil(now + self.ttl_s))
            text = f"{SCHEME}:{bits}:{expires}:{cid}:{_client_tag(client)}:{resource}"
            challenge = Challenge(id=cid, client=client, bits=bits, issued_at=now, expires_at=expires,
                                  resource=resource, challenge=text, signature=self._sign(text))
            self._pending[cid] = (challenge, payload)
            self._per_client[client] = self._per_client.get(client, 0) + 1
        return challenge

    def redeem(self, challenge: str, signature: str, nonce: str, client: str) -> tuple[Challenge, Any]:
        """Check a solution and hand back the challenge and its payload, once.

        Checks, in order: format, HMAC signature, client, expiry, single use, the solution (one
        SHA-256). A wrong nonce leaves the challenge redeemable until it expires.

        Raises:
            ChallengeMalformedError, ChallengeForgedError, ChallengeClientMismatchError,
            ChallengeExpiredError, ChallengeReplayedError, ChallengeUnknownError,
            InvalidSolutionError: each with a sentence saying what was wrong.
        """
        if not isinstance(challenge, str) or len(challenge) > 256 or not (m := _CHALLENGE_RE.match(challenge)):
            raise ChallengeMalformedError("The challenge is not a proof-of-work challenge issued by this server "
                                          "(expected 'sg-pow-1:bits:expires:id:client-tag:resource').")
        if not isinstance(signature, str) or not hmac.compare_digest(self._sign(challenge), signature.lower()):
            raise ChallengeForgedError("The challenge's signature does not match: it was altered or not issued by "
                                       "this server.")
        if not hmac.compare_digest(m["tag"], _client_tag(client)):
            raise ChallengeClientMismatchError("This challenge was issued to another API key.")
        now = self._clock()
        cid, bits, expires = m["id"], int(m["bits"]), int(m["expires"])
        with self._lock:
            if cid in self._redeemed:
                raise ChallengeReplayedError("This challenge was already redeemed; each challenge is single use.")
            if expires < now:
                entry = self._pending.pop(cid, None)
                if entry is not None:
                    self._release(entry[0].client)
                raise ChallengeExpiredError(f"This challenge expired {now - expires:.0f} s ago; send the request "
                                            "again for a new one.")
            entry = self._pending.get(cid)
            if entry is None:
                raise ChallengeUnknownError("This server holds no such challenge (it may have restarted); send the "
                                            "request again for a new one.")
            if not verify_solution(challenge, bits, nonce):
                raise InvalidSolutionError(f"The nonce does not solve the challenge: SHA256(challenge + ':' + nonce) "
                                           f"must start with {bits} zero bits.")
            self._pending.pop(cid)
            self._release(entry[0].client)
            self._redeemed[cid] = expires
            self._purge(now)
        return entry
