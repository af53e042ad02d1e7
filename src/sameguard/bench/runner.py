"""The benchmark runner: victim dataset x attack x detector x seed, the SAME paper's protocol.

For each victim dataset and seed:

1. The train split is halved at random (seeded): the **defender half** trains the victim and
   every detector (10 % of it held out); the **attacker half** is what an attacker with
   in-distribution data holds (the sanity row, JBDA's seed images).
2. Each attack runs against the bare victim through a :class:`~sameguard.guard.Guard` without a detector that
   records its queries; its substitute accuracy and fidelity are measured on the test split.
3. The scored set is the attack's **last** ``B = scored_queries`` queries, a contiguous stream
   (for attacks that send exactly ``B`` queries, all of them). For DFME that is the end of its
   run: images of its most trained generator together with their zeroth-order perturbed copies,
   exactly as they reached the API. ``B`` normal-user queries are drawn from the test split.
   Outlier data for detectors that need it comes from the named dataset's *test* split, attack
   pools from *train* splits, so no detector trains on the images an attack sends.
4. Every detector scores both sets (stateful detectors see each as one client's stream);
   AUROC, AUPR, FPR at 95 % TPR and TPR at 1 % FPR follow, attack = positive.

Victims, fitted detectors and attack query sets are cached under ``<outdir>/cache`` by a key of
everything that determines them, so a re-run only scores.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from ..api import ArtifactError, SaveableDetector
from ..attacks import NormalUser, attack_data_role, build_attack
from ..cache import cache_key, cached_victim, preset_architecture
from ..data import ImageDataset, load_dataset
from ..detectors import build_detector, fit_detector
from ..guard import Guard
from ..steps import StepLog
from ..victim import Victim
from .config import ATTACKER_HALF, AttackSpec, BenchConfig, DetectorSpec
from .metrics import detection_metrics
from .report import plot_histograms, plot_roc, write_results

logger = logging.getLogger(__name__)

__all__ = ["run_benchmark"]

#: Outlier data comes from the *test* split of the named dataset, attack pools from *train* splits,
#: so a detector never trains on the very images an attack sends.
OUTLIER_SPLIT = "test"



def _dataset(name: str, split: str, halves: dict[str, ImageDataset], data_dir: str | None) -> ImageDataset:
    if name == ATTACKER_HALF:
        return halves["attacker"]
    return load_dataset(name, split, data_dir=data_dir)


def _fit_detector(spec: DetectorSpec, victim: Victim, fit_data: ImageDataset, *, seed: int, cache: Path,
                  device: str, progress: bool | None, data_dir: str | None) -> tuple[Any, float]:
    """Fit (or load from the cache) one detector; returns it and its fit time in seconds."""
    detector = build_detector(spec.name, spec.params, preset=spec.preset, seed=seed, device=device, progress=progress)
    params = detector.get_params()
    # Parameters that only change scoring (SAME's alpha) share one fitted detector.
    scoring_only = {k: params.pop(k) for k in detector.SCORING_ONLY_PARAMS if k in params}
    key = cache_key(kind=spec.name, victim=victim.weights_sha256, n=len(fit_data), params=params,
                    architecture=preset_architecture(params), preset=spec.preset,
                    outlier=(spec.outlier_data, OUTLIER_SPLIT), seed=seed)
    path = cache / f"detector-{spec.name}-{key}"
    can_cache = isinstance(detector, SaveableDetector)
    if can_cache and path.is_dir():
        try:
            loaded = type(detector).load(path, victim, device=device)
            for name, value in scoring_only.items():
                setattr(loaded, name, value)
            meta = json.loads((path / "bench.json").read_text())
            logger.info("Reusing the cached %s in %s", spec.label, path)
            return loaded, float(meta["fit_seconds"])
        except (ArtifactError, FileNotFoundError, KeyError, ValueError) as exc:
            logger.warning("Ignoring the cached detector in %s: %s", path, exc)
    outlier = None
    if "outlier-data" in detector.NEEDS:
        if spec.outlier_data is None:
            raise ValueError(f"The detector {spec.label!r} needs outlier data: set outlier_data in its config entry.")
        outlier = load_dataset(spec.outlier_data, OUTLIER_SPLIT, data_dir=data_dir)
    start = time.perf_counter()
    fit_detector(detector, victim, fit_data, outlier)
    fit_seconds = time.perf_counter() - start
    if can_cache:
        detector.save(path)
        (path / "bench.json").write_text(json.dumps({"fit_seconds": fit_seconds}))
    return detector, fit_seconds


def _attack_queries(spec: AttackSpec, victim: Victim, test: ImageDataset, halves: dict[str, ImageDataset], *,
                    scored: int, seed: int, cache: Path, data_dir: str | None, device: str,
                    progress: bool | None) -> dict[str, Any]:
    """Run one attack (or load its cached result): the last ``scored`` queries and its quality."""
    key = cache_key(kind="attack", victim=victim.weights_sha256, name=spec.name, budget=spec.budget,
                    proxy=spec.proxy, seed_data=spec.seed_data, output=spec.output, params=spec.params,
                    scored=scored, seed=seed)
    path = cache / f"attack-{spec.label.replace(' ', '_').replace('/', '_')}-{key}"
    if (path / "queries.safetensors").is_file() and (path / "result.json").is_file():
        logger.info("Reusing the cached %s queries in %s", spec.label, path)
        result = json.loads((path / "result.json").read_text())
        result["queries_tensor"] = safetensors.torch.load_file(str(path / "queries.safetensors"))["queries"]
        return result
    kwargs = dict(spec.params)
    kwargs.setdefault("seed", seed)
    kwargs.setdefault("device", device)
    kwargs.setdefault("progress", progress)
    role = attack_data_role(spec.name)
    if role == "proxy":
        data = (_dataset(spec.proxy, "train", halves, data_dir),)
    elif role == "seeds":
        data = (_dataset(spec.seed_data or ATTACKER_HALF, "train", halves, data_dir),)
    else:
        data = ()
    attack = build_attack(spec.name, *data, **kwargs)
    api = Guard(victim, output=spec.output, record_inputs=True, keep_decisions=0)
    logger.info("Running %s with a budget of %d queries", spec.label, spec.budget)
    res = attack.run(api, spec.budget, victim=victim, test_data=test)
    queries = api.inputs(res.client)[-scored:].contiguous()
    result = {"queries_used": res.queries, "substitute_accuracy": res.test_accuracy, "fidelity": res.fidelity,
              "attack_seconds": res.seconds}
    path.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({"queries": queries}, str(path / "queries.safetensors"))
    (path / "result.json").write_text(json.dumps(result, indent=2))
    result["queries_tensor"] = queries
    return result


def _timed_scores(detector: Any, x: torch.Tensor) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    scores = detector.score(x)
    ms = 1000 * (time.perf_counter() - start) / len(x)
    return torch.as_tensor(scores).double().numpy(), ms


def run_benchmark(config: BenchConfig, outdir: str | Path, *, data_dir: str | None = None, device: str = "cpu",
                  progress: bool | None = None, echo: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run every cell of ``config``; write results, report and plots to ``outdir``; return the records.

    ``echo`` receives one line per finished step (data, victim, each detector, each attack, the
    report); by default a :class:`~sameguard.steps.StepLog` logs it with the elapsed time.
    """
    echo = echo if echo is not None else StepLog()
    out = Path(outdir)
    cache = out / "cache"
    plots = out / "plots"
    cache.mkdir(parents=True, exist_ok=True)
    plots.mkdir(parents=True, exist_ok=True)
    B = config.scored_queries
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for dataset in config.datasets:
        full_train = load_dataset(dataset, "train", data_dir=data_dir)
        test = load_dataset(dataset, "test", data_dir=data_dir)
        echo(f"[{dataset}] data: {len(full_train)} training and {len(test)} test images")
        for seed in config.seeds:
            defender, attacker = full_train.split_off(0.5, seed=seed)
            halves = {"attacker": attacker}
            fit_data, _held_out = defender.split_off(0.1, seed=seed)
            victim = cached_victim(cache, defender, test, arch=config.victim.arch, epochs=config.victim.epochs,
                                   lr=config.victim.lr, seed=seed, device=device, progress=progress)
            echo(f"[{dataset} seed {seed}] victim {config.victim.arch}: test accuracy {victim.test_accuracy:.4f}")
            benign = NormalUser(test, seed=seed + 10_000, progress=False)
            benign_api = Guard(victim, record_inputs=True, keep_decisions=0)
            benign_client = benign.run(benign_api, B).client
            benign_x = benign_api.inputs(benign_client)

            detectors = {}
            for spec in config.detectors:
                detector, fit_seconds = _fit_detector(spec, victim, fit_data, seed=seed, cache=cache, device=device,
                                                      progress=progress, data_dir=data_dir)
                benign_scores, _ = _timed_scores(detector, benign_x)
                detectors[spec.label] = (spec, detector, fit_seconds, benign_scores)
                echo(f"[{dataset} seed {seed}] detector {spec.label}: fitted ({fit_seconds:.0f} s)")

            for aspec in config.attacks:
                attack = _attack_queries(aspec, victim, test, halves, scored=B, seed=seed, cache=cache,
                                         data_dir=data_dir, device=device, progress=progress)
                echo(f"[{dataset} seed {seed}] attack {aspec.label}: {attack['queries_used']} queries, "
                     f"substitute accuracy "
                     f"{attack['substitute_accuracy']:.4f}, fidelity {attack['fidelity']:.4f}")
                curves = {}
                for label, (spec, detector, fit_seconds, benign_scores) in detectors.items():
                    attack_scores, ms = _timed_scores(detector, attack["queries_tensor"])
                    m = detection_metrics(benign_scores, attack_scores)
                    curves[label] = (benign_scores, attack_scores)
                    alarm = {}
                    if hasattr(detector, "queries_until_alarm"):  # per-client alarms (PRADA)
                        alarm = {"alarm_after_attack": detector.queries_until_alarm(attack["queries_tensor"]),
                                 "alarm_after_benign": detector.queries_until_alarm(benign_x)}
                    records.append({
                        "dataset": dataset, "victim_accuracy": victim.test_accuracy, "attack": aspec.label,
                        "budget": aspec.budget, "seed": seed, "queries_used": attack["queries_used"],
                        "substitute_accuracy": attack["substitute_accuracy"], "fidelity": attack["fidelity"],
                        "scored_queries": B, "detector": label,
                        "needs": ", ".join(sorted(detector.NEEDS)) or "nothing (black box)",
                        "auroc": m.auroc, "aupr": m.aupr, "fpr95": m.fpr95, "tpr_at_1fpr": m.tpr_at_1fpr,
                        "fit_seconds": fit_seconds, "score_ms_per_query": ms, **alarm,
                    })
                if seed == config.seeds[0]:
                    stem = f"{dataset}-{aspec.label}".replace(" ", "_").replace("/", "_")
                    plot_roc(curves, plots / f"roc-{stem}.png", f"{dataset}: {aspec.label}")
                    first = next(iter(curves))
                    plot_histograms(*curves[first], plots / f"hist-{stem}-{first}.png",
                                    f"{first} scores: {aspec.label}")
    notes = [
        f"Profile `{config.name}` ({config.source}); seeds {list(config.seeds)}; B = {B} attack queries (the last B "
        f"each attack sent) against B normal-user queries from the test split; total run time "
        f"{time.perf_counter() - t0:.0f} s.",
        "Victim and detectors are trained on one half of the train split; the other half is the attacker's "
        "in-distribution data (JBDA seeds, the in-distribution Knockoff row).",
    ]
    write_results(records, out, title=f"sameguard benchmark: {config.name}", config=config.to_dict(), notes=notes)
    echo(f"report: {len(records)} rows written to {out}")
    return records
