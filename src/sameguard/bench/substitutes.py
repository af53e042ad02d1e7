"""Substitute-quality benchmark: how good a clone does each attack get for a query budget?

For every attack and budget, the attack is run against a fresh, undefended
:class:`~sameguard.guard.Guard` (no detector) and its substitute is evaluated **offline** on the victim's
test set: substitute accuracy, fidelity (top-1 agreement with the victim) and accuracy relative
to the victim's (the "x" of DFME and MAZE). These are the attack-success metrics of the
model-extraction literature (see ``reference/methods.md``, "Evaluation metrics and query
budgets"); they show that the attacks the detectors are measured against actually work.

Example::

    victim = Victim.load("runs/victim")
    test = load_dataset("fashion-mnist", "test")
    _, held_out = load_dataset("fashion-mnist", "train").split_off(0.1, seed=0)
    rows = run_substitute_benchmark(victim, test, ["knockoff", "jbda", "dfme"], [1000, 4000],
                                    seed=0, proxy=load_dataset("digits", "train"), seeds_data=held_out)
    print(format_table(rows))

A benchmark, not a test: the figures come from running the code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from ..attacks import ATTACKS, attack_data_role, build_attack
from ..data import ImageDataset
from ..guard import Guard
from ..training import accuracy

logger = logging.getLogger(__name__)

__all__ = ["run_substitute_benchmark", "format_table", "COLUMNS"]

#: ``(row key, table header)`` of :func:`format_table`.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("attack", "attack"),
    ("budget", "budget"),
    ("queries", "queries used"),
    ("substitute_accuracy", "substitute accuracy"),
    ("fidelity", "fidelity"),
    ("victim_accuracy", "victim accuracy"),
    ("seconds", "seconds"),
)


def run_substitute_benchmark(
    victim: Callable[[torch.Tensor], torch.Tensor],
    test_data: ImageDataset,
    attacks: Iterable[str] = ("knockoff", "jbda", "jbda-tr", "dfme"),
    budgets: Iterable[int] = (1000, 4000),
    seed: int = 0,
    *,
    proxy: ImageDataset | None = None,
    seeds_data: ImageDataset | None = None,
    output: str = "probabilities",
    options: Mapping[str, Mapping[str, Any]] | None = None,
    device: str | torch.device | None = "cpu",
    progress: bool | None = None,
) -> list[dict[str, Any]]:
    """Run each attack at each budget against ``victim`` and measure its substitute.

    Args:
        victim: the victim classifier (``images -> probabilities``, with ``image_shape`` and
            ``num_classes``; a :class:`~sameguard.victim.Victim`). It is served through a fresh
            :class:`~sameguard.guard.Guard` per run and used offline for evaluation.
        test_data: the victim's test set (accuracy and fidelity are measured on it).
        attacks: registry names (see :data:`sameguard.attacks.ATTACKS`).
        budgets: query budgets; every attack spends each exactly.
        seed: seed of every attack; the same seed gives the same table (up to the seconds).
        proxy: the image pool of the proxy-based attacks (``knockoff``, ``knockoff-adaptive``).
        seeds_data: the in-distribution images of the seed-based attacks (``jbda``, ``jbda-tr``),
            e.g. a held-out part of the victim's training split.
        output: what the API answers, ``"probabilities"`` or ``"labels"``; attacks that need
            probabilities are skipped (with a log line) under ``"labels"``.
        options: per-attack constructor overrides, e.g. ``{"knockoff": {"epochs": 30}}``.
        device: where substitutes are trained.
        progress: progress bars (``None``: when stderr is a terminal).

    Returns:
        One dict per run: ``attack``, ``budget``, ``queries``, ``substitute_accuracy``,
        ``fidelity``, ``normalized_accuracy`` (substitute / victim accuracy),
        ``victim_accuracy``, ``seconds``, ``output``, ``seed`` and ``details`` (the attack's own
        facts, JSON-friendly).
    """
    attacks, budgets, options = _checked_request(attacks, budgets, options, proxy, seeds_data)
    victim_accuracy = accuracy(victim, test_data.images, test_data.labels)
    logger.info("Victim accuracy on %d test images: %.4f", len(test_data), victim_accuracy)
    rows: list[dict[str, Any]] = []
    for name in attacks:
        for budget in budgets:
            role = attack_data_role(name)
            args: Sequence[Any] = (proxy,) if role == "proxy" else (seeds_data,) if role == "seeds" else ()
            attack = build_attack(name, *args, **{"seed": seed, "device": device, "progress": progress,
                                                  **options.get(name, {})})
            if output == "labels" and attack.requires_probabilities():
                logger.info("Skipping %s: it needs probabilities and the API returns labels only.", name)
                continue
            rows.append(_attack_row(attack, name, budget, victim, test_data, victim_accuracy, output, seed))
    return rows


def _checked_request(attacks: Iterable[str], budgets: Iterable[int], options: Mapping[str, Mapping[str, Any]] | None,
                     proxy: ImageDataset | None, seeds_data: ImageDataset | None,
                     ) -> tuple[list[str], list[int], dict[str, Mapping[str, Any]]]:
    """The attacks, budgets and options of :func:`run_substitute_benchmark` as lists and a dict, checked."""
    attacks = list(attacks)
    budgets = [int(b) for b in budgets]
    options = dict(options or {})
    if not attacks or not budgets:
        raise ValueError("Give at least one attack and one budget.")
    if any(b < 1 for b in budgets):
        raise ValueError(f"Budgets must be positive integers, got {budgets}.")
    for name in list(attacks) + list(options):
        if name not in ATTACKS:
            raise ValueError(f"Unknown attack {name!r}; choose one of {sorted(ATTACKS)}.")
    for name in attacks:
        role = attack_data_role(name)
        if role == "proxy" and proxy is None:
            raise ValueError(f"The {name} attack queries a proxy image pool: pass proxy=<ImageDataset>.")
        if role == "seeds" and seeds_data is None:
            raise ValueError(f"The {name} attack starts from in-distribution seed images: pass seeds_data=<ImageDataset>.")
    return attacks, budgets, options


def _attack_row(attack: Any, name: str, budget: int, victim: Callable[[torch.Tensor], torch.Tensor],
                test_data: ImageDataset, victim_accuracy: float, output: str, seed: int) -> dict[str, Any]:
    """Run ``attack`` with ``budget`` queries against a fresh undefended guard; one row of the table."""
    api = Guard(victim, output=output, keep_decisions=0)  # type: ignore[arg-type]
    start = time.perf_counter()
    result = attack.run(api, budget, victim=victim, test_data=test_data)
    seconds = time.perf_counter() - start
    if api.queries_used(result.client) != result.queries or result.queries > budget:
        raise RuntimeError(f"{name} spent {api.queries_used(result.client)} queries for a budget of {budget}.")
    logger.info("%s @ %d: accuracy %.4f, fidelity %.4f (%.1f s)", name, budget,
                result.test_accuracy, result.fidelity, seconds)
    return {
        "attack": name,
        "budget": budget,
        "queries": result.queries,
        "substitute_accuracy": result.test_accuracy,
        "fidelity": result.fidelity,
        "normalized_accuracy": (result.test_accuracy / victim_accuracy) if victim_accuracy > 0 else None,
        "victim_accuracy": victim_accuracy,
        "seconds": round(seconds, 1),
        "output": output,
        "seed": seed,
        "details": {k: v for k, v in result.details.items() if isinstance(v, (int, float, str, list, dict))},
    }


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "seconds":
        return f"{float(value):.1f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_table(rows: Iterable[Mapping[str, Any]]) -> str:
    """A Markdown table of benchmark rows: attack, budget, queries used, substitute accuracy,
    fidelity, victim accuracy and seconds (accuracies as fractions in ``[0, 1]``)."""
    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |",
             "|" + "|".join("---" if k == "attack" else "---:" for k, _ in COLUMNS) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(k, row.get(k)) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)
