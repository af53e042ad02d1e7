"""What the provider does with a detector's score: monitor, reject, misinform, or make the client pay.

=================  ===========================  ====================================================
policy name        class                        above the calibrated threshold ``tau``
=================  ===========================  ====================================================
``monitor``        :class:`Monitor`             nothing: answer, record the flag (detection only)
``reject``         :class:`Reject`              withhold the answer
``misinformation`` :class:`Misinformation`      answer ``(1-a) y + a y_mis`` (Kariyappa & Qureshi 2020)
``pow``            :class:`ProofOfWork`         every query pays a HashCash puzzle whose difficulty
                                                grows with the score (Dziedzic et al. 2022)
=================  ===========================  ====================================================

A :class:`Policy` maps scores to one of these (``Policy("reject")``, ``Policy(Misinformation(nu=1e4))``);
:class:`~sameguard.guard.Guard` puts victim, detector and policy together. The proof-of-work puzzle
(:mod:`.puzzle`) is shared with the service, which issues and redeems the challenges
(:mod:`sameguard.service.challenges`).
"""

from __future__ import annotations

from .base import ACTION_LABELS, Action, ActionOutcome
from .misinformation import (
    Misinformation,
    least_likely,
    misinformation_weight,
    mislead,
    reverse_probabilities,
)
from .monitor import Monitor
from .policy import POLICIES, Policy, build_action
from .proof_of_work import ProofOfWork
from .puzzle import batch_bits, expected_hashes, leading_zero_bits, solve, verify_solution
from .reject import Reject

__all__ = [
    "ACTION_LABELS",
    "Action",
    "ActionOutcome",
    "Monitor",
    "Reject",
    "Misinformation",
    "ProofOfWork",
    "Policy",
    "POLICIES",
    "build_action",
    "batch_bits",
    "expected_hashes",
    "leading_zero_bits",
    "solve",
    "verify_solution",
    "least_likely",
    "mislead",
    "misinformation_weight",
    "reverse_probabilities",
]
