"""Proof-of-work challenges over HTTP: issue them signed, hold them, redeem each one once.

The puzzle is :mod:`sameguard.actions.puzzle` (HashCash with SHA-256); the price of a batch comes
from :class:`~sameguard.actions.ProofOfWork` through the guard. Here the service turns that price
into a challenge it can check later without trusting the client:

* the challenge string is ``"sg-pow-1:<bits>:<expires>:<id>:<client tag>:<resource>"``, signed with
  HMAC-SHA256 under a server secret, so the client cannot lower ``bits`` or move the expiry;
* the issuer keeps each unsolved challenge with the answers it holds (the *payload*) in the
  service's state store (:mod:`.store`: in memory, or Redis shared by every worker), so a challenge
  is redeemed **once** across all workers (a replay is refused), only by the client it was issued
  to, and only before it expires;
* a solution is checked with one SHA-256 (plus the HMAC).

Every refusal is a :class:`ChallengeError` whose ``reason`` says what was wrong and whose
``status`` is the HTTP status the service answers.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from ..actions.puzzle import MAX_BITS, SCHEME, verify_solution
from ..api import SameguardError
from ..validation import check_choice, check_int, check_positive
from .store import TOO_MANY_CLIENT, MemoryServiceStore, ServiceStore

__all__ = ["Challenge", "ChallengeIssuer", "ChallengeError"]

_CHALLENGE_RE = re.compile(  # ASCII digits only (\d would also match other scripts' digits)
    r"^sg-pow-1:(?P<bits>\d{1,3}):(?P<expires>\d{1,12}):(?P<id>[0-9a-f]{32}):(?P<tag>[0-9a-f]{16}):(?P<resource>[0-9a-f]{0,64})\Z",
    re.ASCII,
)
_RESOURCE_RE = re.compile(r"[0-9a-f]{0,64}")


class ChallengeError(SameguardError, ValueError):
    """A challenge was refused, at issue or at redemption.

    Attributes:
        reason: what was wrong, one of :attr:`STATUS`'s keys (also the outcome written to the
            proof-of-work event log and the metrics).
        status: the HTTP status the service answers for it.
    """

    #: HTTP status by reason.
    STATUS: ClassVar[dict[str, int]] = {
        "malformed": 400,        # not a challenge string this server issues
        "forged": 403,           # the HMAC signature does not match (altered, or another server's)
        "clientmismatch": 403,   # issued to another client
        "invalidsolution": 403,  # the nonce does not give the required zero bits
        "replayed": 409,         # already redeemed (single use)
        "expired": 410,          # past its expiry
        "unknown": 410,          # correctly signed, but not held here (e.g. issued before a restart)
        "toomany": 429,          # the client (or the server) holds too many unsolved challenges
    }

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = check_choice(reason, "reason", tuple(self.STATUS))

    @property
    def status(self) -> int:
        """The HTTP status for :attr:`reason`."""
        return self.STATUS[self.reason]


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
    """Issues HMAC-signed challenges, holds them in a :class:`~.store.ServiceStore` until redeemed
    or expired, redeems each once.

    Args:
        secret: HMAC key (at least 16 bytes); ``None`` draws 32 random bytes, so challenges do not
            survive a restart (they are short-lived anyway). Every worker sharing a store must use
            the same secret.
        ttl_s: seconds a challenge stays valid (default 120).
        max_pending: most unsolved challenges held for all clients (default 10000).
        max_pending_per_client: most unsolved challenges per client (default 32).
        clock: a function returning UNIX seconds (tests pass a fake one).
        store: where challenges are held (default a new in-memory store: one process). With a
            shared store (Redis) a challenge issued by one worker is redeemed by any, once, and the
            caps count every worker's challenges.

    Thread-safe (the store is).
    """

    def __init__(self, secret: bytes | None = None, *, ttl_s: float = 120.0, max_pending: int = 10_000,
                 max_pending_per_client: int = 32, clock: Callable[[], float] = time.time,
                 store: ServiceStore | None = None) -> None:
        if secret is not None and (not isinstance(secret, bytes) or len(secret) < 16):
            raise ValueError("secret must be bytes of length at least 16 (e.g. secrets.token_bytes(32)).")
        self._secret = secret if secret is not None else secrets.token_bytes(32)
        self.ttl_s = check_positive(ttl_s, "ttl_s")
        self.max_pending = check_int(max_pending, "max_pending", minimum=1)
        self.max_pending_per_client = check_int(max_pending_per_client, "max_pending_per_client", minimum=1)
        self._clock = clock
        self.store: ServiceStore = store if store is not None else MemoryServiceStore()

    @property
    def pending(self) -> int:
        """Number of unexpired challenges issued and not yet redeemed."""
        return self.store.pending_challenges(self._clock())

    def issue(self, client: str, bits: int, payload: Any = None, resource: str = "") -> Challenge:
        """Create and store a challenge for ``client`` at ``bits``; ``payload`` is handed back on redemption.

        Args:
            client: who must solve it (only this client can redeem it).
            bits: difficulty, ``0 <= bits <= 64``.
            payload: what redemption hands back (the service: the held answers); JSON-serialisable
                when the store is shared.
            resource: lowercase hex digest (at most 64 characters) of what is paid for.

        Raises:
            ChallengeError: reason ``"toomany"``: the client or the server holds too many unsolved
                challenges.
        """
        bits = check_int(bits, "bits", minimum=0, maximum=MAX_BITS)
        if not isinstance(resource, str) or not _RESOURCE_RE.fullmatch(resource):
            raise ValueError("resource must be a lowercase hex digest of at most 64 characters.")
        now = self._clock()
        cid = secrets.token_hex(16)
        expires = math.ceil(now + self.ttl_s)
        text = f"{SCHEME}:{bits}:{expires}:{cid}:{_client_tag(client)}:{resource}"
        challenge = Challenge(id=cid, client=client, bits=bits, issued_at=now, expires_at=expires,
                              resource=resource, challenge=text, signature=self._sign(text))
        value = {"challenge": asdict(challenge), "payload": payload} if self.store.shared else (challenge, payload)
        full = self.store.hold_challenge(cid, client, expires, value, now=now, max_per_client=self.max_pending_per_client,
                                         max_total=self.max_pending)
        if full == TOO_MANY_CLIENT:
            raise ChallengeError("toomany", f"Client has {self.max_pending_per_client} unsolved proof-of-work "
                                            "challenges outstanding; redeem or let them expire before asking for more.")
        if full is not None:
            raise ChallengeError("toomany", "The server holds too many unsolved proof-of-work challenges; retry later.")
        return challenge

    def redeem(self, challenge: str, signature: str, nonce: str, client: str) -> tuple[Challenge, Any]:
        """Check a solution and hand back the challenge and its payload, once (across every worker
        sharing the store).

        Checks, in order: format, HMAC signature, client, single use, expiry, that the store
        holds it, the solution (one SHA-256); then claims it atomically. A wrong nonce leaves the
        challenge redeemable until it expires.

        Raises:
            ChallengeError: with a sentence saying what was wrong; ``reason`` is ``"malformed"``,
                ``"forged"``, ``"clientmismatch"``, ``"replayed"``, ``"expired"``, ``"unknown"``
                or ``"invalidsolution"``.
        """
        fields = self._authenticate(challenge, signature, client)
        cid, bits, expires = fields["id"], int(fields["bits"]), int(fields["expires"])
        now = self._clock()
        state = self.store.challenge_state(cid)
        if state == "redeemed":
            raise _replayed()
        if expires < now:
            if state == "held":
                self.store.drop_challenge(cid, client)
            raise ChallengeError("expired", f"This challenge expired {now - expires:.0f} s ago; send the request "
                                            "again for a new one.")
        if state != "held":
            raise _unknown()
        if not verify_solution(challenge, bits, nonce):
            raise ChallengeError("invalidsolution", "The nonce does not solve the challenge: SHA256(challenge "
                                                    f"+ ':' + nonce) must start with {bits} zero bits.")
        outcome, value = self.store.take_challenge(cid, client, expires)
        if outcome == "redeemed":
            raise _replayed()
        if outcome != "taken":
            raise _unknown()
        if isinstance(value, dict):
            return Challenge(**value["challenge"]), value["payload"]
        return value

    # -- internals --
    def _sign(self, text: str) -> str:
        return hmac.new(self._secret, text.encode("ascii"), hashlib.sha256).hexdigest()

    def _authenticate(self, challenge: object, signature: object, client: str) -> re.Match[str]:
        """The challenge's fields, once its format, signature and client are checked."""
        if not isinstance(challenge, str) or len(challenge) > 256 or not (m := _CHALLENGE_RE.match(challenge)):
            raise ChallengeError("malformed", "The challenge is not a proof-of-work challenge issued by this server "
                                              "(expected 'sg-pow-1:bits:expires:id:client-tag:resource').")
        if (not isinstance(signature, str) or not signature.isascii()
                or not hmac.compare_digest(self._sign(challenge), signature.lower())):
            raise ChallengeError("forged", "The challenge's signature does not match: it was altered or not issued "
                                           "by this server.")
        if not hmac.compare_digest(m["tag"], _client_tag(client)):
            raise ChallengeError("clientmismatch", "This challenge was issued to another API key.")
        return m


def _replayed() -> ChallengeError:
    return ChallengeError("replayed", "This challenge was already redeemed; each challenge is single use.")


def _unknown() -> ChallengeError:
    return ChallengeError("unknown", "This server holds no such challenge (it may have restarted); send the "
                                     "request again for a new one.")
