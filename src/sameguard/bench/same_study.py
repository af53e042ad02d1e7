"""SAME at the scale a CPU affords: a scaling study, score variants, and a default chosen without peeking.

For a benchmark profile's victim (``quick`` or ``standard``; victims and attack queries come from
that profile's cache, so run ``sameguard bench --config <profile>`` first or let this run them),
the study fits SAME with MAEs of several sizes and training budgets (:data:`CANDIDATES`), scores
every fit with every score variant (:data:`SCORINGS`: scoring-only parameters, one fit each),
and measures for each pair:

* AUROC on the **validation anomalies** (:mod:`sameguard.bench.validation_anomalies`: noise, blur,
  perturbations, shuffled patches and inverted images made from the defender's own held-out
  images), against the other half of those held-out images as benign;
* AUROC on each of the profile's **attacks** (the benchmark's protocol: the attack's last B queries
  against B normal-user queries of the test split), next to MSP's;
* the fit time and the scoring cost per query.

**The rule that picks the default** (:func:`choose_default`) reads the validation columns only:
among the pairs whose fit took at most :data:`MAX_FIT_SECONDS` and whose scoring costs at most
:data:`MAX_COST_RATIO` times the authors' scoring of the ``cpu`` preset, take the highest *worst*
AUROC over the validation kinds; ties within half a point go to the higher mean AUROC, then to the
shorter fit. The attacks and the digits data play no part in it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..attacks import NormalUser
from ..data import load_dataset
from ..detectors import AUTHORS_SCORING, MSPDetector
from ..guard import Guard
from ..models import MAEConfig
from ..steps import StepLog
from .config import BenchConfig, DetectorSpec
from .metrics import detection_metrics
from .runner import _attack_queries, _fit_detector, _Run, _start_run, _timed_scores
from .validation_anomalies import validation_anomalies

logger = logging.getLogger(__name__)

__all__ = ["Candidate", "CANDIDATES", "SCALING_AXES", "SCORINGS", "SWEEP_SCORINGS", "run_study", "choose_default",
           "MAX_FIT_SECONDS", "MAX_COST_RATIO", "AUTHORS"]

#: A fit may take at most this long on the 2-core machine to be chosen (issue 10: 15 minutes).
MAX_FIT_SECONDS = 15 * 60.0
#: A chosen scoring may cost at most this many times the authors' scoring of the ``cpu`` preset.
MAX_COST_RATIO = 1.5
#: The authors' scoring (alpha 0.99, mask ratio 0, raw terms).
AUTHORS = "authors"
#: The candidate that is the ``cpu`` preset (the reference of the cost ratio).
CPU = "cpu (w32, p4, 6 ep, 20k)"


@dataclass(frozen=True)
class Candidate:
    """One SAME fit: overrides of the ``cpu`` preset (MAE architecture and training budget).

    ``scorings`` limits the score variants evaluated for it (``None``: all of :data:`SCORINGS`),
    for fits too slow to score many times on a CPU.
    """

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    scorings: tuple[str, ...] | None = None


def _mae(patch: int, width: int, depth: int, decoder_depth: int, heads: int) -> MAEConfig:
    return MAEConfig(image_size=28, in_channels=1, patch_size=patch, emb_dim=width, encoder_depth=depth,
                     encoder_heads=heads, decoder_depth=decoder_depth, decoder_heads=heads)


#: The score variants of the scaling sweep's fits (names in :data:`SCORINGS`).
SWEEP_SCORINGS = ("authors", "s2 only", "standardised, alpha 0.5", "masked (r 0.75, 1 mask)")
#: The training subset of the study's reference fit. Every candidate names its MAE and its subset, so
#: the study measures the same fits whatever the ``cpu`` preset (the overrides' base) becomes.
_20K = 20000
#: The candidates' names (the scaling axes refer to them).
_W64, _12EP, _ALL, _P2 = "w64, p4, 6 ep, 20k", "w32, p4, 12 ep, 20k", "w32, p4, 6 ep, all", "w32, p2, 6 ep, 20k"
_AUTHORS_1, _AUTHORS_2 = "authors' MAE (w192, p2, 12/4), 1 ep, 2k", "authors' MAE (w192, p2, 12/4), 2 ep, 10k"
_W16, _W128 = "w16, p4, 6 ep, 20k", "w128, p4, 6 ep, 20k"
_SHALLOW, _DEEP = "w64, p4, 2/1 blocks, 6 ep, 20k", "w64, p4, 8/4 blocks, 6 ep, 20k"
_5K, _3EP, _24EP = "w32, p4, 6 ep, 5k", "w32, p4, 3 ep, 20k", "w32, p4, 24 ep, 20k"
#: The fits of the study (28x28 grey victims), from the old ``cpu`` preset up to the authors' architecture.
CANDIDATES: tuple[Candidate, ...] = (
    Candidate(CPU, {"mae": "small", "max_train_samples": _20K}),
    Candidate(_W64, {"mae": "medium", "max_train_samples": _20K}),
    Candidate(_12EP, {"mae": "small", "mae_epochs": 12, "max_train_samples": _20K}),
    Candidate(_ALL, {"mae": "small", "max_train_samples": None}),
    Candidate(_P2, {"mae": _mae(2, 32, 4, 2, 4), "max_train_samples": _20K}),
    Candidate(_AUTHORS_1, {"mae": "paper", "mae_epochs": 1, "mae_warmup_epochs": 0.1, "max_train_samples": 2000},
              scorings=("authors", "s2 only", "masked (r 0.75, 1 mask)")),
    # The scaling sweep (candidates 6 to 13): one factor at a time around the fits above (SCALING_AXES),
    # scored with the authors' formula, its s2 term, the default's standardised terms and masked scoring.
    Candidate(_W16, {"mae": _mae(4, 16, 4, 2, 4), "max_train_samples": _20K}, scorings=SWEEP_SCORINGS),
    Candidate(_W128, {"mae": _mae(4, 128, 4, 2, 4), "max_train_samples": _20K}, scorings=SWEEP_SCORINGS),
    Candidate(_SHALLOW, {"mae": _mae(4, 64, 2, 1, 4), "max_train_samples": _20K}, scorings=SWEEP_SCORINGS),
    Candidate(_DEEP, {"mae": _mae(4, 64, 8, 4, 4), "max_train_samples": _20K}, scorings=SWEEP_SCORINGS),
    Candidate(_5K, {"mae": "small", "max_train_samples": 5000}, scorings=SWEEP_SCORINGS),
    Candidate(_3EP, {"mae": "small", "mae_epochs": 3, "max_train_samples": _20K}, scorings=SWEEP_SCORINGS),
    Candidate(_24EP, {"mae": "small", "mae_epochs": 24, "max_train_samples": _20K}, scorings=SWEEP_SCORINGS),
    Candidate(_AUTHORS_2, {"mae": "paper", "mae_epochs": 2, "mae_warmup_epochs": 0.2, "max_train_samples": 10000},
              scorings=SWEEP_SCORINGS),
)

#: The scaling study's axes: axis -> ``(fit, value)`` pairs that differ from each other in that factor
#: only (``None`` for the training images: every image of the defender's fit split).
SCALING_AXES: dict[str, tuple[tuple[str, float | None], ...]] = {
    "MAE width (patch 4, 4+2 blocks)": ((_W16, 16), (CPU, 32), (_W64, 64), (_W128, 128)),
    "MAE blocks, encoder + decoder (width 64)": ((_SHALLOW, 3), (_W64, 6), (_DEEP, 12)),
    "patch size (width 32)": ((_P2, 2), (CPU, 4)),
    "MAE training epochs (width 32)": ((_3EP, 3), (CPU, 6), (_12EP, 12), (_24EP, 24)),
    "training images (width 32)": ((_5K, 5000), (CPU, _20K), (_ALL, None)),
    "the authors' MAE: image-epochs": ((_AUTHORS_1, 2000), (_AUTHORS_2, 20000)),
}

#: Scoring variants (scoring-only parameters of :class:`~sameguard.detectors.SAMEDetector`).
_MASK1 = {"score_mask_ratio": 0.75, "score_masks": 1}
_STD = {"standardize": True, "alpha": 0.5}
SCORINGS: dict[str, dict[str, Any]] = {
    AUTHORS: {},
    "s2 only": {"alpha": 0.0},
    "standardised, alpha 0.5": _STD,
    "complexity (png), standardised, alpha 0.5": {"complexity": "png", **_STD},
    "masked (r 0.75, 1 mask)": _MASK1,
    "masked (r 0.75, 4 masks)": {"score_mask_ratio": 0.75, "score_masks": 4},
    "masked (1 mask), standardised, alpha 0.5": {**_MASK1, **_STD},
    "masked (1 mask), complexity (png), standardised, alpha 0.5": {**_MASK1, "complexity": "png", **_STD},
}
#: Validation images per set (benign half and each anomaly kind): enough for a stable AUROC, cheap to score.
VALIDATION_SIZE = 1000
_NEEDS_CALIBRATION = ("standardize", "complexity")


def _auroc(benign: np.ndarray, anomalous: np.ndarray) -> float:
    return detection_metrics(benign, anomalous).auroc


@dataclass
class _Sets:
    """The image sets every detector scores in one seed."""

    calibration: torch.Tensor                 # half of the held-out images: fits standardisation / complexity
    validation_benign: torch.Tensor           # the other half
    validation: dict[str, torch.Tensor]       # kind -> anomalies made from validation_benign
    test_benign: torch.Tensor                 # B normal-user queries of the test split
    attacks: dict[str, torch.Tensor]          # attack label -> its last B queries


def _image_sets(run: _Run, config: BenchConfig) -> _Sets:
    held = run.held_out.images
    order = torch.randperm(len(held), generator=torch.Generator().manual_seed(run.seed))
    half = len(held) // 2
    calibration, validation = held[order[:half]], held[order[half:]][:VALIDATION_SIZE]
    api = Guard(run.victim, record_inputs=True, keep_decisions=0)
    client = NormalUser(run.test, seed=run.seed + 10_000, progress=False).run(api, config.scored_queries).client
    attacks = {a.label: _attack_queries(a, run)["queries_tensor"] for a in config.attacks}
    return _Sets(calibration, validation, validation_anomalies(validation, seed=run.seed), api.inputs(client), attacks)


def _evaluate(detector: Any, sets: _Sets) -> dict[str, Any]:
    """Validation and attack AUROCs of one scoring of one fit, and its cost."""
    val_benign, ms = _timed_scores(detector, sets.validation_benign)
    validation = {kind: _auroc(val_benign, _timed_scores(detector, x)[0]) for kind, x in sets.validation.items()}
    test_benign, _ = _timed_scores(detector, sets.test_benign)
    attacks = {label: _auroc(test_benign, _timed_scores(detector, x)[0]) for label, x in sets.attacks.items()}
    return {"validation": validation, "attacks": attacks, "score_ms": ms,
            "validation_min": min(validation.values()), "validation_mean": float(np.mean(list(validation.values())))}


def _score_variants(detector: Any, sets: _Sets, scorings: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    defaults = {k: getattr(detector, k) for v in scorings.values() for k in v if hasattr(detector, k)}
    out = {}
    for name, params in scorings.items():
        missing = [k for k in params if not hasattr(detector, k)]
        if missing:
            logger.warning("Skipping the scoring %r: this SAMEDetector has no parameter(s) %s", name, missing)
            continue
        for key, value in {**defaults, **params}.items():
            setattr(detector, key, value)
        if any(params.get(k) for k in _NEEDS_CALIBRATION):
            detector.calibrate(sets.calibration, 0.01)
        out[name] = _evaluate(detector, sets)
    for key, value in defaults.items():
        setattr(detector, key, value)
    return out


def _study_seed(run: _Run, config: BenchConfig, candidates: Sequence[Candidate],
                scorings: dict[str, dict[str, Any]], echo: Callable[[str], None],
                save: Callable[[list[dict[str, Any]]], None]) -> list[dict[str, Any]]:
    sets = _image_sets(run, config)
    base = {"dataset": run.dataset, "seed": run.seed, "victim_accuracy": run.victim.test_accuracy,
            "defender_images": len(run.fit_data)}
    msp = MSPDetector().fit(run.victim)
    records = [{**base, "candidate": "MSP", "scoring": "msp", "fit_seconds": 0.0, "parameters": 0,
                **_evaluate(msp, sets)}]
    for cand in candidates:
        # The authors' score underneath, so that each scoring variant changes only what it names.
        spec = DetectorSpec(name="same", label=cand.name, preset="cpu", params={**AUTHORS_SCORING, **cand.params})
        detector, fit_seconds = _fit_detector(spec, run.victim, run.fit_data, seed=run.seed, cache=run.cache,
                                              device=run.device, progress=run.progress, data_dir=run.data_dir)
        parameters = sum(p.numel() for p in detector.reconstructor_.parameters())
        chosen = {k: v for k, v in scorings.items() if cand.scorings is None or k in cand.scorings}
        for name, result in _score_variants(detector, sets, chosen).items():
            records.append({**base, "candidate": cand.name, "scoring": name, "fit_seconds": fit_seconds,
                            "parameters": parameters, **result})
        echo(f"{run.where} {cand.name}: fitted in {fit_seconds:.0f} s ({parameters} MAE parameters), "
             f"authors' scoring: validation worst {records[-len(chosen)]['validation_min']:.3f}")
        save(records)  # a long study keeps what it measured if it is stopped
    return records


def run_study(config: BenchConfig, bench_dir: str | Path, out: str | Path, *,
              candidates: Sequence[Candidate] = CANDIDATES, scorings: dict[str, dict[str, Any]] | None = None,
              data_dir: str | None = None, device: str = "cpu", progress: bool | None = None,
              echo: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run the study for every dataset and seed of ``config``; write ``<out>/study.json``; return the records.

    ``bench_dir`` is the profile's benchmark folder: its ``cache`` holds (or receives) the victims,
    the attack queries and the fitted detectors.
    """
    echo = echo if echo is not None else StepLog()
    scorings = SCORINGS if scorings is None else scorings
    common = {"cache": Path(bench_dir) / "cache", "plots": Path(out) / "plots", "data_dir": data_dir,
              "device": device, "progress": progress, "echo": echo}
    for folder in (common["cache"], common["plots"]):
        folder.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []

    def save(new: list[dict[str, Any]]) -> None:
        data = {"profile": config.name, "records": records + new}
        (Path(out) / "study.json").write_text(json.dumps(data, indent=2))

    for dataset in config.datasets:
        full_train = load_dataset(dataset, "train", data_dir=data_dir)
        test = load_dataset(dataset, "test", data_dir=data_dir)
        for seed in config.seeds:
            run = _start_run(config, dataset, seed, full_train, test, **common)
            records += _study_seed(run, config, candidates, scorings, echo, save)
    save([])
    return records


def _mean(records: Sequence[dict[str, Any]], key: Callable[[dict[str, Any]], float]) -> float:
    return float(np.mean([key(r) for r in records]))


def choose_default(records: Sequence[dict[str, Any]]) -> tuple[str, str] | None:
    """The (candidate, scoring) the rule of the module docstring picks, from validation columns only."""
    pairs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        if r["candidate"] != "MSP":
            pairs.setdefault((r["candidate"], r["scoring"]), []).append(r)
    reference = pairs.get((CPU, AUTHORS))
    cost_cap = MAX_COST_RATIO * _mean(reference, lambda r: r["score_ms"]) if reference else math.inf
    eligible = {p: rs for p, rs in pairs.items()
                if _mean(rs, lambda r: r["fit_seconds"]) <= MAX_FIT_SECONDS
                and _mean(rs, lambda r: r["score_ms"]) <= cost_cap}
    if not eligible:
        return None

    def rank(p: tuple[str, str]) -> tuple[float, float, float]:
        rs = eligible[p]
        worst = round(_mean(rs, lambda r: r["validation_min"]) * 200) / 200  # half-point bins
        return (worst, _mean(rs, lambda r: r["validation_mean"]), -_mean(rs, lambda r: r["fit_seconds"]))

    return max(eligible, key=rank)


