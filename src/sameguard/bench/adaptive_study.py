"""The benchmark's slow-and-wide study: one attack spread over ``k`` API keys, through the real guard.

The extraction table of the alarm study (:mod:`sameguard.bench.report`) *estimates* the keys an
attacker needs for its whole budget from one key's alarm query. This study measures it: for each
attack named in the profile's ``[key_sweep]`` table and each ``k`` in its ``keys``, the attack runs
again with its budget spread round-robin over ``k`` keys (:func:`sameguard.attacks.over_keys`)
against the guard of the alarm study (per-client alarms calibrated on held-out benign images,
``policy`` on every query of an alarmed key), and the study records, per ``k``:

* how many of the ``k`` keys were alarmed, and at which of its own queries each was;
* the answers the attacker got **before** any alarm of the key that asked (summed over keys), as
  a share of the budget: the part of the budget bought unnoticed;
* the substitute's accuracy and fidelity when everything after a key's alarm is ``policy``-ed.

Config (TOML)::

    [key_sweep]
    attacks = ["Knockoff (digits proxy)"]   # labels of [[attacks]] entries
    keys = [1, 4, 16, 64]
    policy = "reject"                        # what alarmed keys get: reject or misinformation
    rotation = "round-robin"

It needs the ``[alarms]`` table (the guard's alarms are that study's combination).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..validation import check_choice, check_int

logger = logging.getLogger(__name__)

__all__ = ["KeySweepSpec", "parse_key_sweep", "key_sweep_records", "key_sweep_report"]


@dataclass(frozen=True)
class KeySweepSpec:
    """The ``[key_sweep]`` table: attacks (labels) run over each number of keys in ``keys``."""

    attacks: tuple[str, ...]
    keys: tuple[int, ...]
    policy: str = "reject"
    rotation: str = "round-robin"


def parse_key_sweep(raw: Mapping[str, Any] | None, where: str, attack_labels: Sequence[str],
                    has_alarms: bool) -> KeySweepSpec | None:
    """Validate the ``[key_sweep]`` table (``None`` when absent)."""
    if raw is None:
        return None
    w = f"{where} [key_sweep]"
    extra = set(raw) - {"attacks", "keys", "policy", "rotation"}
    if extra:
        raise ValueError(f"{w}: unknown key(s) {sorted(extra)}; allowed: attacks, keys, policy, rotation.")
    if not has_alarms:
        raise ValueError(f"{w}: the key sweep runs through the alarm study's guard; add an [alarms] table.")
    attacks = raw.get("attacks")
    if not isinstance(attacks, list) or not attacks:
        raise ValueError(f"{w}: 'attacks' must be a non-empty list of [[attacks]] labels, got {attacks!r}.")
    for label in attacks:
        if label not in attack_labels:
            raise ValueError(f"{w}: {label!r} is not the label of an [[attacks]] entry; labels: {sorted(attack_labels)}.")
    keys = raw.get("keys")
    if not isinstance(keys, list) or not keys:
        raise ValueError(f"{w}: 'keys' must be a non-empty list of positive integers, got {keys!r}.")
    try:
        keys_t = tuple(check_int(k, "each of keys") for k in keys)
        policy = check_choice(raw.get("policy", "reject"), "policy", ("reject", "misinformation"))
        rotation = check_choice(raw.get("rotation", "round-robin"), "rotation", ("round-robin", "blocks"))
    except ValueError as exc:
        raise ValueError(f"{w}: {exc}") from None
    return KeySweepSpec(attacks=tuple(attacks), keys=keys_t, policy=policy, rotation=rotation)


def key_sweep_records(run: Any, detectors: Mapping[str, Any], spec: KeySweepSpec,
                      plain: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Run each attack of ``spec`` over each number of keys through the alarm study's guard.

    Args:
        run: the runner's per-(dataset, seed) state.
        detectors: the runner's fitted detectors (label -> (spec, detector, fit seconds, scores)).
        plain: the attacks' unguarded results by label (for the unguarded accuracy column).
    """
    from ..attacks import over_keys
    from .runner import _build_attack, _guard_for

    records = []
    for label in spec.attacks:
        aspec = next(a for a in run.config.attacks if a.label == label)
        for k in spec.keys:
            if k > aspec.budget:
                logger.warning("Skipping %d keys for %s: more keys than its budget of %d.", k, label, aspec.budget)
                continue
            guard = _guard_for(run, detectors, spec.policy, aspec.output)
            attack = over_keys(_build_attack(replace(aspec), run), k, spec.rotation)
            res = attack.run(guard, aspec.budget, victim=run.victim, test_data=run.test)
            per_key = res.details["per_key"]
            alarms = {}
            for key in res.details["keys"]:
                ev = guard.alarms.evidence(key)
                alarms[key] = None if ev is None else ev.alarm_query
            unnoticed = sum(per_key[key] if q is None else min(q - 1, per_key[key]) for key, q in alarms.items())
            records.append({
                "dataset": run.dataset, "seed": run.seed, "kind": "key-sweep", "attack": label, "keys": k,
                "budget": aspec.budget, "policy": spec.policy, "rotation": spec.rotation,
                "queries_per_key": max(per_key.values()), "keys_alarmed": sum(q is not None for q in alarms.values()),
                "alarm_queries": [q for q in alarms.values()], "answered_unnoticed": unnoticed,
                "substitute_accuracy": res.test_accuracy, "fidelity": res.fidelity,
                "unguarded_accuracy": None if plain is None else plain[label]["substitute_accuracy"],
            })
            r = records[-1]
            run.echo(f"{run.where} {label} over {k} keys: {r['keys_alarmed']}/{k} keys alarmed, "
                     f"{unnoticed}/{aspec.budget} answered before an alarm, substitute accuracy {res.test_accuracy:.4f}")
    return records


def _median(values: Sequence[int | None]) -> str:
    finite = sorted(v for v in values if v is not None)
    if not finite:
        return "–"
    mid = finite[len(finite) // 2] if len(finite) % 2 else (finite[len(finite) // 2 - 1] + finite[len(finite) // 2]) / 2
    return f"{mid:g}" if len(finite) == 1 else f"{mid:g} [{finite[0]}–{finite[-1]}]"


def _percent(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def key_sweep_report(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown table of the key sweep (empty when there is none)."""
    rows = [r for r in records if r.get("kind") == "key-sweep"]
    if not rows:
        return []
    policy = rows[0]["policy"]
    lines = ["", f"### Slow and wide: the budget over k API keys, through the guard ({policy} after a key's alarm)", "",
             "Each attack runs again with its budget spread round-robin over k keys; per-client alarms as in the "
             "alarm study. *Answered unnoticed*: answers a key got before its own alarm, summed over keys. Alarm "
             "query: the key's own query count at its alarm, median [range] over alarmed keys.", "",
             "| attack | keys k | queries per key | keys alarmed | alarm at key query | answered unnoticed | "
             "substitute accuracy % (guarded) | unguarded % | seed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['attack']} | {r['keys']} | {r['queries_per_key']} | {r['keys_alarmed']} / {r['keys']} | "
            f"{_median(r['alarm_queries'])} | {r['answered_unnoticed']} / {r['budget']} "
            f"({100 * r['answered_unnoticed'] / r['budget']:.0f} %) | {_percent(r['substitute_accuracy'])} | "
            f"{_percent(r.get('unguarded_accuracy'))} | {r['seed']} |")
    return lines
