"""Challenge redemption in the library refuses non-ASCII input with a ChallengeError, never a TypeError."""

from __future__ import annotations

import pytest

from sameguard.service.challenges import ChallengeError, ChallengeIssuer


def test_non_ascii_signature_and_unicode_digits_are_refused_cleanly():
    issuer = ChallengeIssuer(secret=b"s" * 32)
    challenge = issuer.issue("client", bits=1)
    with pytest.raises(ChallengeError) as forged:
        issuer.redeem(challenge.challenge, "é" * 64, "0", "client")
    assert forged.value.reason == "forged"
    arabic_digit = challenge.challenge.replace(":1:", ":\u0661:", 1)  # ARABIC-INDIC DIGIT ONE
    with pytest.raises(ChallengeError) as malformed:
        issuer.redeem(arabic_digit, challenge.signature, "0", "client")
    assert malformed.value.reason == "malformed"
