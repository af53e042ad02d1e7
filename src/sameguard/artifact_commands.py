"""``sameguard artifacts sign|verify|digest DIR``: authenticate artifact folders (:mod:`sameguard.artifact_auth`).

* ``sign DIR``: write ``sameguard-auth.json``, the HMAC-SHA256 of every file under ``DIR`` under the
  key in ``SAMEGUARD_ARTIFACT_KEY`` (the key is read from the environment only, never from the command line).
* ``verify DIR``: check ``DIR`` as the service would (key, pinned digests, required or not) and print how
  it is trusted (``hmac``, ``pinned`` or ``unauthenticated``); exit 0 when it would be loaded, 2 with the
  reason when it would be refused. An unsigned folder passes unless ``--require`` (or
  ``SAMEGUARD_REQUIRE_AUTHENTICATED_ARTIFACTS``) is given.
* ``digest DIR``: print the folder's digest, to pin it (``SAMEGUARD_ARTIFACT_DIGESTS``, ``serve --artifact-digest``).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

__all__ = ["add_artifact_commands", "cmd_artifacts", "add_trust_flag", "trust_from_args"]


def add_artifact_commands(sub: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add ``artifacts`` to the sub-parsers ``sub``; returns ``{"artifacts": cmd_artifacts}``."""
    from .artifact_auth import DIGESTS_ENV, KEY_ENV

    p = sub.add_parser("artifacts", help="sign, verify or digest artifact folders (authentication, not just hashes)",
                       description=f"sign: HMAC every file of DIR (manifest included) with the key in ${KEY_ENV}. "
                                   "verify: check DIR the way serve and the other commands load it. digest: print "
                                   f"the digest to pin (${DIGESTS_ENV}, serve --artifact-digest).")
    p.add_argument("action", choices=["sign", "verify", "digest"], help="what to do")
    p.add_argument("folders", nargs="+", metavar="DIR", help="artifact folder(s): victim, detector, alarms")
    p.add_argument("--require", action="store_true",
                   help="verify: fail unless the folder is signed with the key or pinned (as with "
                        "--require-authenticated-artifacts)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="show the library's log (-vv for debug)")
    return {"artifacts": cmd_artifacts}


def cmd_artifacts(args: argparse.Namespace) -> int:
    """Run ``sameguard artifacts ACTION DIR...``."""
    from .artifact_auth import KEY_ENV, ArtifactTrust, authenticate_folder, folder_digest, sign_folder

    if args.action == "digest":
        for folder in args.folders:
            print(f"{folder_digest(folder)}  {folder}")
        return 0
    trust = ArtifactTrust.from_env(required=True if args.require else None)
    if args.action == "sign":
        if trust.key is None:
            raise ValueError(f"Set {KEY_ENV} to the artifact key (at least 16 bytes) to sign; it is read from the "
                             "environment only.")
        for folder in args.folders:
            path = sign_folder(folder, trust.key)
            print(f"signed {folder} ({path.name})")
        return 0
    for folder in args.folders:
        how = authenticate_folder(folder, trust)
        print(f"{folder}: {how}")
    return 0


def add_trust_flag(parser: argparse.ArgumentParser) -> None:
    """The top-level ``--require-authenticated-artifacts`` flag."""
    parser.add_argument("--require-authenticated-artifacts", action="store_true",
                        help="refuse to load any artifact folder that is neither signed with $SAMEGUARD_ARTIFACT_KEY "
                             "nor pinned in $SAMEGUARD_ARTIFACT_DIGESTS (also: "
                             "SAMEGUARD_REQUIRE_AUTHENTICATED_ARTIFACTS=1)")


def trust_from_args(args: argparse.Namespace) -> Any:
    """The artifact trust for a CLI run: the environment's, required when the flag was given."""
    from .artifact_auth import ArtifactTrust, trusting

    required = True if getattr(args, "require_authenticated_artifacts", False) else None
    return trusting(ArtifactTrust.from_env(os.environ, required=required))

