"""Benchmark configuration: a TOML file validated into typed objects that construct the classes.

A config names the victim datasets, the victim architecture and training, the attacks (with their
budgets and the data they hold), the detectors (with their hyper-parameters), the seeds and the
number ``scored_queries`` (``B``) of attack and benign queries scored per cell. Named profiles
(``quick``, ``standard``, ``paper``) ship in ``sameguard/bench/profiles/``. Algorithms never see
the config tree: the runner turns each entry into constructor keyword arguments.

Example::

    name = "mine"
    datasets = ["fashion-mnist"]
    seeds = [0, 1]
    scored_queries = 1000
    [victim]
    arch = "conv3"
    epochs = 3
    [[attacks]]
    name = "knockoff"        # a key of sameguard.attacks.ATTACKS
    budget = 1000
    proxy = "digits"         # a dataset name, or "attacker-half" (held-out half of the train split)
    [[detectors]]
    name = "same"            # a key of sameguard.detectors.DETECTORS
    preset = "cpu"
    params = { alpha = 0.99 }
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..validation import check_choice, check_eta, check_fraction, check_int
from .adaptive_study import KeySweepSpec, parse_key_sweep

__all__ = ["AttackSpec", "DetectorSpec", "VictimSpec", "AlarmSpec", "BenchConfig", "load_config", "PROFILES"]

#: Profiles shipped with the package.
PROFILES = ("quick", "standard", "paper", "adaptive")
#: The pseudo-dataset name for the held-out half of the victim dataset's train split.
ATTACKER_HALF = "attacker-half"


def _require(table: dict, key: str, kind: type, where: str) -> Any:
    if key not in table:
        raise ValueError(f"{where}: the key {key!r} is required.")
    value = table[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ValueError(f"{where}: {key!r} must be of type {kind.__name__}, got {value!r}.")
    return value


def _unknown(table: dict, allowed: set[str], where: str) -> None:
    extra = set(table) - allowed
    if extra:
        raise ValueError(f"{where}: unknown key(s) {sorted(extra)}; allowed: {sorted(allowed)}.")


@dataclass(frozen=True)
class VictimSpec:
    arch: str = "conv3"
    epochs: int = 5
    lr: float = 0.1


@dataclass(frozen=True)
class AttackSpec:
    """One attack row: ``name`` from :data:`sameguard.attacks.ATTACKS`, its budget and data."""

    name: str
    budget: int
    label: str
    proxy: str | None = None          # Knockoff's query pool
    seed_data: str | None = None      # JBDA's seed pool (default: attacker-half)
    output: str = "probabilities"     # what the API answers
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DetectorSpec:
    """One detector row: ``name`` from :data:`sameguard.detectors.DETECTORS` and its parameters."""

    name: str
    label: str
    preset: str | None = None
    outlier_data: str | None = None   # for detectors that need outlier data
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AlarmSpec:
    """The per-client alarm study (``[alarms]``): which detectors, how many benign clients.

    ``detectors`` are labels of per-query detectors evaluated alone, ``combination`` the labels whose
    martingales are averaged; ``stream`` adds the stream test of each client's own queries. Attack
    streams are the first ``stream_queries`` queries of each attack. ``actions`` (``reject``,
    ``misinformation``, ``pow``): run every attack again through the guard, with that action on every
    query of an alarmed client, and measure what normal users still get. ``per_query_fpr``: also act on
    single queries before the alarm, at SAME's threshold for that benign false-positive rate; ``None``
    (default) acts on alarmed clients only, so normal users lose nothing to per-query false positives.
    ``calibration_conditional``: ``eta`` for calibration-conditional p-values
    (:class:`~sameguard.evidence.ConformalCalibrator` ``conditional``); ``None`` (default): marginal ones.
    ``stream_pool_size``: the stream test compares images average-pooled to this size
    (:class:`~sameguard.evidence.StreamExchangeabilityTest` ``pool_size``); ``None`` (default): every pixel
    (the library's own default pools to 14 since 0.3.0's release; the profiles keep every pixel, their saved seeds' key).
    """

    detectors: tuple[str, ...]
    combination: tuple[str, ...] = ()
    stream: bool = True
    delta: float = 1e-3
    benign_clients: int = 1000
    client_queries: int = 300
    stream_queries: int = 1000
    actions: tuple[str, ...] = ()
    per_query_fpr: float | None = None
    calibration_conditional: float | None = None
    stream_pool_size: int | None = None


@dataclass(frozen=True)
class BenchConfig:
    name: str
    datasets: tuple[str, ...]
    seeds: tuple[int, ...]
    scored_queries: int
    victim: VictimSpec
    attacks: tuple[AttackSpec, ...]
    detectors: tuple[DetectorSpec, ...]
    alarms: AlarmSpec | None = None
    source: str = ""
    key_sweep: KeySweepSpec | None = None  # the slow-and-wide study (sameguard.bench.adaptive_study)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _parse_attacks(raw: dict[str, Any], where: str, scored: int, known: set[str]) -> list[AttackSpec]:
    from ..attacks import ATTACKS, attack_data_role

    attacks = []
    for i, at in enumerate(_require(raw, "attacks", list, where)):
        w = f"{where} [[attacks]] #{i + 1}"
        _unknown(at, {"name", "budget", "label", "proxy", "seed_data", "output", "params"}, w)
        aname = _require(at, "name", str, w)
        if aname not in ATTACKS:
            raise ValueError(f"{w}: unknown attack {aname!r}; choose from {sorted(ATTACKS)}.")
        budget = _require(at, "budget", int, w)
        if budget < scored:
            raise ValueError(f"{w}: budget {budget} is below scored_queries {scored}; every attack must send "
                             "at least the B queries that are scored.")
        for key in ("proxy", "seed_data"):
            if at.get(key) is not None and at[key] != ATTACKER_HALF and at[key] not in known:
                raise ValueError(f"{w}: {key} {at[key]!r} is neither a dataset nor {ATTACKER_HALF!r}.")
        output = at.get("output", "probabilities")
        if output not in ("probabilities", "labels"):
            raise ValueError(f"{w}: output must be 'probabilities' or 'labels', got {output!r}.")
        if attack_data_role(aname) in ("proxy", "proxy+seeds") and at.get("proxy") is None:
            raise ValueError(f"{w}: the {aname} attack needs a proxy image pool: set proxy = \"<dataset>\".")
        attacks.append(AttackSpec(name=aname, budget=budget, label=at.get("label", aname), proxy=at.get("proxy"),
                                  seed_data=at.get("seed_data"), output=output,
                                  params=dict(at.get("params", {}))))
    return attacks


def _parse_detectors(raw: dict[str, Any], where: str, known: set[str]) -> list[DetectorSpec]:
    from ..detectors import DETECTORS

    detectors = []
    for i, dt in enumerate(_require(raw, "detectors", list, where)):
        w = f"{where} [[detectors]] #{i + 1}"
        _unknown(dt, {"name", "label", "preset", "outlier_data", "params"}, w)
        dname = _require(dt, "name", str, w)
        if dname not in DETECTORS:
            raise ValueError(f"{w}: unknown detector {dname!r}; choose from {sorted(DETECTORS)}.")
        if dt.get("outlier_data") is not None and dt["outlier_data"] not in known:
            raise ValueError(f"{w}: outlier_data {dt['outlier_data']!r} is not a dataset.")
        detectors.append(DetectorSpec(name=dname, label=dt.get("label", dname), preset=dt.get("preset"),
                                      outlier_data=dt.get("outlier_data"), params=dict(dt.get("params", {}))))
    return detectors


def _parse_alarms(raw: dict[str, Any] | None, where: str, detectors: list[DetectorSpec]) -> AlarmSpec | None:
    if raw is None:
        return None
    w = f"{where} [alarms]"
    fields = {"detectors", "combination", "stream", "delta", "benign_clients", "client_queries", "stream_queries",
              "actions", "per_query_fpr", "calibration_conditional", "stream_pool_size"}
    _unknown(raw, fields, w)
    labels = {d.label for d in detectors}
    chosen = tuple(_require(raw, "detectors", list, w))
    combination = tuple(raw.get("combination", ()))
    for label in chosen + combination:
        if label not in labels:
            raise ValueError(f"{w}: {label!r} is not the label of a [[detectors]] entry; labels: {sorted(labels)}.")
    try:
        spec = AlarmSpec(detectors=chosen, combination=combination, stream=bool(raw.get("stream", True)),
                         delta=check_fraction(raw.get("delta", 1e-3), "delta", include_low=False, include_high=False),
                         benign_clients=check_int(raw.get("benign_clients", 1000), "benign_clients"),
                         client_queries=check_int(raw.get("client_queries", 300), "client_queries"),
                         stream_queries=check_int(raw.get("stream_queries", 1000), "stream_queries"),
                         actions=tuple(check_choice(a, "each of actions", ("reject", "misinformation", "pow"))
                                       for a in raw.get("actions", ())),
                         per_query_fpr=None if raw.get("per_query_fpr") is None else check_fraction(
                             raw["per_query_fpr"], "per_query_fpr", include_low=False, include_high=False),
                         calibration_conditional=None if raw.get("calibration_conditional") is None else check_eta(
                             raw["calibration_conditional"], "calibration_conditional"),
                         stream_pool_size=None if raw.get("stream_pool_size") is None else check_int(
                             raw["stream_pool_size"], "stream_pool_size"))
    except ValueError as exc:
        raise ValueError(f"{w}: {exc}") from None
    return spec


def parse_config(raw: dict[str, Any], source: str = "<dict>") -> BenchConfig:
    """Validate a config table (as read from TOML) into a :class:`BenchConfig`."""
    from ..data import available_datasets

    where = source
    _unknown(raw, {"name", "datasets", "seeds", "scored_queries", "victim", "attacks", "detectors", "alarms",
                   "key_sweep"}, where)
    name = _require(raw, "name", str, where)
    datasets = tuple(_require(raw, "datasets", list, where))
    known = set(available_datasets())
    for d in datasets:
        if d not in known:
            raise ValueError(f"{where}: unknown dataset {d!r}; choose from {sorted(known)}.")
    seeds = tuple(raw.get("seeds", [0]))
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"{where}: 'seeds' must be a non-empty list of integers, got {seeds!r}.")
    scored = _require(raw, "scored_queries", int, where)
    if scored < 10:
        raise ValueError(f"{where}: 'scored_queries' must be at least 10, got {scored}.")
    vt = raw.get("victim", {})
    _unknown(vt, {"arch", "epochs", "lr"}, f"{where} [victim]")
    victim = VictimSpec(**vt)
    if not isinstance(victim.arch, str) or not isinstance(victim.epochs, int) or victim.epochs < 1:
        raise ValueError(f"{where} [victim]: arch must be a name and epochs a positive integer, got {vt!r}.")
    attacks = _parse_attacks(raw, where, scored, known)
    detectors = _parse_detectors(raw, where, known)
    for what, items in (("attack", attacks), ("detector", detectors)):
        labels = [item.label for item in items]
        if len(set(labels)) != len(labels):
            raise ValueError(f"{where}: {what} labels must be unique (set label = ...), got {labels}.")
    return BenchConfig(name=name, datasets=datasets, seeds=seeds, scored_queries=scored, victim=victim,
                       attacks=tuple(attacks), detectors=tuple(detectors),
                       alarms=_parse_alarms(raw.get("alarms"), where, detectors), source=source,
                       key_sweep=parse_key_sweep(raw.get("key_sweep"), where, [a.label for a in attacks],
                                                 "alarms" in raw))


def load_config(name_or_path: str | os.PathLike) -> BenchConfig:
    """A profile name (``quick``, ``standard``, ``paper``) or the path of a TOML file."""
    text: str
    if str(name_or_path) in PROFILES:
        text = resources.files("sameguard.bench.profiles").joinpath(f"{name_or_path}.toml").read_text()
        source = f"profile {name_or_path}"
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"No benchmark config at {path} (and it is not one of the profiles {PROFILES}).")
        text, source = path.read_text(), str(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{source} is not valid TOML: {exc}") from None
    return parse_config(raw, source)
