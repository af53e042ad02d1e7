"""The HashCash puzzle (SHA-256) on hand-made cases: zero bits, solve/verify, batch pricing."""

from __future__ import annotations

import hashlib

import pytest

from sameguard.actions import batch_bits, leading_zero_bits, solve, verify_solution

CHALLENGE = "sg-pow-1:12:0:" + "a" * 32 + ":" + "b" * 16 + ":"


@pytest.mark.parametrize(("digest", "bits"), [
    (b"\x00\x00\xff", 16),
    (b"\x00\x01", 15),
    (b"\x80", 0),
    (b"\x00\x00", 16),
])
def test_actions_puzzle_leading_zero_bits_by_hand(digest, bits):
    assert leading_zero_bits(digest) == bits


def test_actions_puzzle_solve_then_verify():
    nonce = solve(CHALLENGE, 12)
    assert leading_zero_bits(hashlib.sha256(f"{CHALLENGE}:{nonce}".encode()).digest()) >= 12
    assert verify_solution(CHALLENGE, 12, nonce)


def _tampered_nonce(nonce: str) -> str:
    """The next counter value after ``nonce`` that does not solve CHALLENGE at 12 bits (deterministic)."""
    return next(str(i) for i in range(int(nonce) + 1, int(nonce) + 10_000)
                if leading_zero_bits(hashlib.sha256(f"{CHALLENGE}:{i}".encode()).digest()) < 12)


@pytest.mark.parametrize("case", ["tampered_nonce", "tampered_challenge", "higher_difficulty", "malformed_nonce",
                                  "empty_nonce"])
def test_actions_puzzle_verify_refuses(case):
    nonce = solve(CHALLENGE, 12)
    challenge, bits = CHALLENGE, 12
    if case == "tampered_nonce":
        nonce = _tampered_nonce(nonce)
    elif case == "tampered_challenge":
        challenge = CHALLENGE.replace(":12:", ":13:")
    elif case == "higher_difficulty":
        bits = 40
    elif case == "malformed_nonce":
        nonce, bits = "bad nonce!", 0
    elif case == "empty_nonce":
        nonce, bits = "", 0
    assert not verify_solution(challenge, bits, nonce)


def test_actions_puzzle_solve_gives_up_and_checks_bits():
    with pytest.raises(ValueError, match="No solution"):
        solve(CHALLENGE, 60, max_attempts=10)
    with pytest.raises(ValueError, match="bits"):
        solve(CHALLENGE, 65)


@pytest.mark.parametrize(("bits", "total"), [
    ([10], 10),
    ([3, 3], 4),
    ([0] * 64, 6),
    ([20, 0], 21),  # ceil: never cheaper than the sum
    ([], 0),
])
def test_actions_puzzle_batch_bits_sums_the_work(bits, total):
    assert batch_bits(bits) == total
