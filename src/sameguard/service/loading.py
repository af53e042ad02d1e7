"""Building the service's :class:`~sameguard.guard.Guard` from saved artifacts and settings."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..actions import Misinformation, Monitor, Policy, ProofOfWork, Reject
from ..detectors.registry import load_detector
from ..guard import Guard
from .settings import ServiceSettings

logger = logging.getLogger(__name__)

__all__ = ["load_guard", "build_policy", "load_calibration_images", "load_alarms"]


def load_calibration_images(spec: str | None, victim: Any, limit: int, seed: int = 0) -> torch.Tensor:
    """Benign images ``(n, C, H, W)`` in ``[-1, 1]`` for calibration, ``n <= limit``.

    ``spec``: a ``.npy`` file or PNG folder, or ``dataset:NAME[:SPLIT]``; ``None`` means the
    victim's dataset, test split.
    """
    from ..data import adapt_to, load_dataset
    from ..imagefiles import read_images

    if spec is None:
        spec = f"dataset:{getattr(victim, 'dataset', '')}:test"
    if spec.startswith("dataset:"):
        parts = spec.split(":")
        name = parts[1]
        split = parts[2] if len(parts) > 2 and parts[2] else "test"
        if not name:
            raise ValueError("The calibration spec 'dataset:NAME[:SPLIT]' needs a dataset name.")
        data = load_dataset(name, split)
        if len(data) > limit:
            data = data.take(limit, seed=seed)
        return adapt_to(data.images, victim.image_shape)
    x, _ = read_images(spec, victim.image_shape)
    if len(x) > limit:
        x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:limit]]
    return x


def build_policy(settings: ServiceSettings) -> Policy:
    """The :class:`~sameguard.actions.Policy` named by ``settings.policy``."""
    if settings.policy in ("off", "monitor"):
        action = Monitor()
    elif settings.policy == "reject":
        action = Reject()
    elif settings.policy == "misinformation":
        action = Misinformation(nu=settings.misinformation_nu)
    else:
        action = ProofOfWork(benign_bits=settings.pow_benign_bits, bits_per_spread=settings.pow_bits_per_spread,
                             max_bits=settings.pow_max_bits, quantile=settings.pow_quantile)
    return Policy(action, threshold=settings.threshold)


def load_guard(settings: ServiceSettings, store: Any = None) -> Guard:
    """Load the victim and detector named in ``settings`` and build the guard (calibrating proof-of-work).

    Every artifact folder (victim, detector, alarms) is loaded under ``settings.artifact_trust()``:
    with ``require_authenticated_artifacts`` a folder that is neither signed with ``artifact_key``
    nor pinned in ``artifact_digests`` is refused, and a signature that does not verify always is.
    """
    from ..artifact_auth import trusting

    with trusting(settings.artifact_trust()):
        return _load_guard(settings, store)


def _load_guard(settings: ServiceSettings, store: Any = None) -> Guard:
    """:func:`load_guard` within the artifact trust.

    ``store``: the service's :class:`~sameguard.service.store.ServiceStore`; the per-client alarm
    state goes to its ``client_states()`` (in Redis, shared by every worker).

    Raises:
        ValueError / ArtifactError: missing or inconsistent artifacts, a detector without threshold.
    """
    from ..victim import Victim

    if settings.victim is None:
        raise ValueError("The service needs a victim: pass --victim DIR (or set SAMEGUARD_VICTIM).")
    victim = Victim.load(settings.victim, device=settings.device)
    policy = build_policy(settings)
    if settings.policy == "off":
        if settings.alarms is not None:
            raise ValueError("Per-client alarms need a detector to score queries: use a policy other than 'off'.")
        logger.warning("Serving the victim with policy 'off': queries are logged but not scored.")
        _compile_if_asked(settings, victim, [])
        return Guard(victim, None, policy, output=settings.output, keep_decisions=0)
    if settings.detector is None:
        raise ValueError(f"The {settings.policy!r} policy needs a detector: pass --detector DIR.")
    detector = load_detector(settings.detector, victim, device=settings.device)
    if settings.threshold is None and detector.threshold_ is None:
        raise ValueError(f"The detector in {settings.detector} is not calibrated: run 'sameguard calibrate' or pass "
                         "--threshold.")
    alarms = None if settings.alarms is None else load_alarms(settings, victim, detector, store=store)
    guard = Guard(victim, detector, policy, alarms=alarms, output=settings.output, keep_decisions=0)
    # after loading: the calibrations' weight checks are done (the hashes would be unchanged anyway)
    _compile_if_asked(settings, victim, [detector, *([] if alarms is None else alarms.scorers.values())])
    if isinstance(policy.action, ProofOfWork):
        benign = load_calibration_images(settings.calibration, victim, settings.calibration_limit)
        guard.calibrate(benign)
        logger.info("Proof-of-work calibration: %s", policy.action.calibration_)
    return guard


def _compile_if_asked(settings: ServiceSettings, victim: Any, detectors: list[Any]) -> None:
    """``serve --compile``: the victim's and the detectors' networks compiled in place and warmed up."""
    if settings.compile:
        from ..compilation import compile_networks

        compile_networks(victim, detectors, backend=settings.compile_backend)


def load_alarms(settings: ServiceSettings, victim: Any, detector: Any, store: Any = None) -> Any:
    """The :class:`~sameguard.alarms.ClientAlarms` in ``settings.alarms``, with their scorers loaded.

    Each scorer's folder comes from ``settings.alarm_detectors`` or, failing that, from the
    ``detectors.json`` that ``sameguard alarms calibrate`` wrote next to the alarms. A scorer whose
    folder is the guard's own detector folder is the guard's ``detector`` object, so the guard
    scores each batch with it once.

    Raises:
        ValueError / ArtifactError: a scorer's folder is unknown, or the calibrations do not match
            the detectors and victim.
    """
    from ..alarm_commands import read_alarm_sources
    from ..alarms import ClientAlarms

    from ..artifact_auth import authenticate_folder

    root = Path(settings.alarms)  # type: ignore[arg-type]
    authenticate_folder(root)  # alarms.json, detectors.json and every calibration under it
    names, recorded = read_alarm_sources(root)
    folders = {name: Path(recorded[name]) for name in names if name in recorded}
    folders.update({name: Path(folder) for name, folder in settings.alarm_detectors.items()})
    missing = sorted(set(names) - set(folders))
    if missing:
        raise ValueError(f"The alarms in {root} need the detector folder of {', '.join(missing)}: pass "
                         "--alarm-detector NAME=DIR for each.")
    own = None if settings.detector is None else Path(settings.detector).resolve()
    scorers = {name: detector if folders[name].resolve() == own else
               load_detector(folders[name], victim, device=settings.device) for name in names}
    alarms = ClientAlarms.load(root, scorers, victim, store=None if store is None else store.client_states())
    logger.info("Per-client alarms from %s: %s", root, alarms.describe())
    return alarms
