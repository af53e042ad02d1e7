"""``sameguard alarms calibrate``: build per-client alarms (:class:`~sameguard.alarms.ClientAlarms`) from saved detectors.

The command loads the victim and one or more saved per-query detectors, calibrates each
detector's scores on benign images (class-conditional conformal p-values), and saves the alarms
to ``--out`` with :meth:`ClientAlarms.save <sameguard.alarms.ClientAlarms.save>`. Next to them it
writes :data:`ALARM_SOURCES_FILE` (scorer name -> the detector folder it was loaded from), which
``sameguard serve --alarms DIR`` reads to load the same detectors again; ``--alarm-detector
NAME=DIR`` overrides a recorded folder (e.g. after moving the artifacts).

Scorer names are the detectors' registry names (``same``, ``mahalanobis``, ...); when two
detectors share one, their folder names are used instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .api import ArtifactError
from .cli_checks import pool_size_arg
from .evidence.stream import DEFAULT_POOL_SIZE, DEFAULT_WINDOW

logger = logging.getLogger(__name__)

__all__ = ["ALARM_SOURCES_FILE", "add_alarm_commands", "cmd_alarms", "scorer_names", "read_alarm_sources",
           "write_alarm_sources"]

#: Scorer name -> detector folder, written next to ``alarms.json`` by ``sameguard alarms calibrate``.
ALARM_SOURCES_FILE = "detectors.json"
MODES = ("ville", "cusum", "shiryaev-roberts")
#: ``--stream-pool-size`` not given (the stream test's default pooling).
_DEFAULT = object()


def add_alarm_commands(sub: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    """Add ``alarms`` to the sub-parsers ``sub``; returns ``{"alarms": cmd_alarms}``."""
    p = sub.add_parser("alarms", help="calibrate per-client alarms (conformal p-values + test martingales)",
                       description="calibrate: score benign images the detectors were not fitted on with each "
                                   "--detector, calibrate class-conditional conformal p-values and save per-client "
                                   "alarms to --out (serve them with 'sameguard serve --alarms DIR'). A benign "
                                   "client whose queries are exchangeable with these images is ever alarmed with "
                                   "probability at most --delta (mode ville).")
    p.add_argument("action", choices=["calibrate"], help="what to do (calibrate)")
    p.add_argument("--victim", required=True, help="folder of a saved victim")
    p.add_argument("--detector", action="append", required=True, metavar="DIR",
                   help="folder of a saved per-query detector (repeatable; the alarms average their martingales)")
    p.add_argument("--images", required=True,
                   help="benign images that neither the detectors nor the victim were trained on: a .npy file or "
                        "a folder of PNGs")
    p.add_argument("--out", required=True, help="output folder for the alarms")
    p.add_argument("--delta", type=float, default=1e-3, help="bound on a benign client's false-alarm probability "
                                                              "(default 1e-3)")
    p.add_argument("--stream", action="store_true", help="add the stream test of each client's own queries "
                                                          "(JBDA-style attacks)")
    p.add_argument("--stream-pool-size", type=pool_size_arg, default=_DEFAULT, metavar="S",
                   help="with --stream: compare images average-pooled to S x S, or 'none' for every pixel "
                        f"(default {DEFAULT_POOL_SIZE}: a fraction of the memory per client and of the time per "
                        "query; the p-values stay valid)")
    p.add_argument("--stream-window", type=int, default=None, metavar="W",
                   help=f"with --stream: the client's bag restarts empty every W queries (default {DEFAULT_WINDOW}; "
                        "at most W x features floats per client; only queries of one block are compared)")
    p.add_argument("--mode", default="ville", choices=MODES,
                   help="ville (default: P(ever alarmed) <= delta), cusum or shiryaev-roberts (react faster to "
                        "a client that turns bad; bound the mean time to a false alarm instead)")
    p.add_argument("--calibration-conditional", type=float, default=None, metavar="ETA",
                   help="calibration-conditional p-values: with probability at least 1 - ETA over the draw of "
                        "--images, the --delta bound holds for these very images (costs power: no p-value below "
                        "about sqrt(log(K / ETA) / (2 x images per class))); default: marginal p-values")
    p.add_argument("--min-class-size", type=int, default=50,
                   help="classes with fewer calibration images share the pooled calibration (default 50)")
    p.add_argument("--seed", type=int, default=0, help="seed of the p-values' smoothing (default 0)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="show the library's log (-vv for debug)")
    return {"alarms": cmd_alarms}


def scorer_names(detectors: Sequence[Any], folders: Sequence[str | os.PathLike]) -> list[str]:
    """One unique name per detector: its registry name, or its folder's name where registry names repeat.

    Raises:
        ValueError: two detectors would still get the same name.
    """
    from .detectors.registry import DETECTORS

    by_class = {cls: name for name, cls in DETECTORS.items()}
    names = [by_class.get(type(d), type(d).__name__.lower()) for d in detectors]
    names = [Path(f).resolve().name if names.count(n) > 1 else n for n, f in zip(names, folders)]
    if len(set(names)) != len(names):
        raise ValueError(f"The detectors would share the names {names}: give each saved detector its own folder name.")
    return names


def write_alarm_sources(out: str | os.PathLike, folders: dict[str, str | os.PathLike]) -> Path:
    """Write :data:`ALARM_SOURCES_FILE` (scorer name -> absolute detector folder) into ``out``."""
    path = Path(out) / ALARM_SOURCES_FILE
    path.write_text(json.dumps({"scorers": {n: str(Path(f).resolve()) for n, f in folders.items()}}, indent=2) + "\n")
    return path


def read_alarm_sources(root: str | os.PathLike) -> tuple[list[str], dict[str, str]]:
    """The scorer names of the alarms in ``root`` (from ``alarms.json``) and the recorded detector folders.

    Raises:
        ArtifactError: ``alarms.json`` is missing or malformed, or :data:`ALARM_SOURCES_FILE` is malformed.
    """
    from .alarms import ALARMS_FILE

    root = Path(root)
    try:
        names = json.loads((root / ALARMS_FILE).read_text())["scorers"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise TypeError("'scorers' is not a list of names")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{root} does not hold readable per-client alarms ({ALARMS_FILE}): {exc}") from None
    sources = root / ALARM_SOURCES_FILE
    if not sources.is_file():
        return names, {}
    try:
        recorded = json.loads(sources.read_text())["scorers"]
        if not isinstance(recorded, dict):
            raise TypeError("'scorers' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{sources} is malformed: {exc}") from None
    return names, {str(k): str(v) for k, v in recorded.items()}


def _load_scorers(args: argparse.Namespace, victim: Any) -> dict[str, tuple[Any, str]]:
    """Name -> (detector, folder) for every ``--detector``; refuses per-client (stateful) detectors."""
    from .api import StatefulDetector
    from .detectors.registry import load_detector

    detectors = []
    for folder in args.detector:
        detector = load_detector(folder, victim, device=args.device)
        if isinstance(detector, StatefulDetector):
            raise ValueError(f"The detector in {folder} ({type(detector).__name__}) is a per-client detector whose "
                             "scores depend on each client's history, so they cannot be calibrated as p-values; use "
                             "per-query detectors (and --stream for evidence from a client's own stream).")
        detectors.append(detector)
    names = scorer_names(detectors, args.detector)
    return {name: (d, f) for name, d, f in zip(names, detectors, args.detector)}


def cmd_alarms(args: argparse.Namespace) -> int:
    """``sameguard alarms calibrate``: see the module docstring; prints one summary line."""
    from .alarms import ClientAlarms
    from .evidence import stream_test
    from .imagefiles import read_images
    from .validation import check_choice, check_eta, check_fraction, check_int
    from .victim import Victim

    check_fraction(args.delta, "--delta", include_low=False, include_high=False)
    check_int(args.min_class_size, "--min-class-size", minimum=1)
    if args.calibration_conditional is not None:
        check_eta(args.calibration_conditional, "--calibration-conditional")
    check_choice(args.mode, "--mode", MODES)
    pool_size = DEFAULT_POOL_SIZE if args.stream_pool_size is _DEFAULT else args.stream_pool_size
    if args.stream_pool_size is not _DEFAULT and not args.stream:
        raise ValueError("--stream-pool-size sets the stream test's pooling: add --stream.")
    if args.stream_window is not None and not args.stream:
        raise ValueError("--stream-window sets the stream test's blocks: add --stream.")
    window = DEFAULT_WINDOW if args.stream_window is None else check_int(args.stream_window, "--stream-window", minimum=2)
    victim = Victim.load(args.victim, device=args.device)
    scorers = _load_scorers(args, victim)
    x, _ = read_images(args.images, victim.image_shape)
    alarms = ClientAlarms.calibrate(victim, {n: d for n, (d, _) in scorers.items()}, x, delta=args.delta,
                                    stream=stream_test(args.stream, pool_size, window), mode=args.mode,
                                    min_class_size=args.min_class_size,
                                    seed=args.seed, conditional=args.calibration_conditional)
    out = alarms.save(args.out)
    write_alarm_sources(out, {n: f for n, (_, f) in scorers.items()})
    conditional = "" if args.calibration_conditional is None else \
        f", calibration-conditional at eta {args.calibration_conditional:g}"
    print(f"alarms for {', '.join(scorers)} calibrated on {len(x)} benign images (delta {args.delta:g}, mode "
          f"{args.mode}, stream test {'on' if args.stream else 'off'}{conditional}); saved to {out}", flush=True)
    return 0
