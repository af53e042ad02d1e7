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
5. With ``[alarms]``, the per-client alarm study (:mod:`sameguard.bench.alarm_study`) calibrates
   on one half of the test split and draws its benign clients from the other: calibration images
   must be unseen by the detectors *and by the victim* (the victim is more confident on its own
   training images, so calibrating MSP or Energy on them makes every benign client look
   anomalous). Each attack's first queries are its stream; each attack then runs again through
   the guard with the configured actions after the alarm.

Victims, fitted detectors and attack query sets are cached under ``<outdir>/cache`` by a key of
everything that determines them, so a re-run only scores.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch

from ..api import ArtifactError, SaveableDetector
from ..attacks import NormalUser, attack_data_role, build_attack
from ..cache import cache_key, cached_victim, preset_architecture
from ..data import ImageDataset, load_dataset
from ..detectors import PRADADetector, build_detector, fit_detector
from ..guard import Guard
from ..steps import StepLog
from ..victim import Victim
from .alarm_cost import alarm_guard, alternate_median_ms
from .alarm_study import AlarmStudy, alarm_sets
from .config import ATTACKER_HALF, AttackSpec, BenchConfig, DetectorSpec
from .metrics import detection_metrics
from .preflight import OUTLIER_SPLIT
from .report import plain_json, plot_histograms, plot_roc, write_results

logger = logging.getLogger(__name__)

__all__ = ["run_benchmark"]

# Outlier data comes from the *test* split of the named dataset (preflight.OUTLIER_SPLIT), attack
# pools from *train* splits, so a detector never trains on the very images an attack sends.


def _dataset(name: str, split: str, halves: dict[str, ImageDataset], data_dir: str | None) -> ImageDataset:
    if name == ATTACKER_HALF:
        return halves["attacker"]
    return load_dataset(name, split, data_dir=data_dir)


def _fit_detector(spec: DetectorSpec, victim: Victim, fit_data: ImageDataset, *, seed: int, cache: Path,
                  device: str, progress: bool | None, data_dir: str | None,
                  fitted: dict[Path, tuple[Any, float]] | None = None) -> tuple[Any, float]:
    """Fit (or load from the cache) one detector; returns it and its fit time in seconds.

    ``fitted`` (cache folder -> detector, fit seconds) holds the detectors already fitted or loaded
    in this run: an entry that differs from one of them only in scoring parameters (SAME's ``alpha``)
    is a shallow copy sharing its networks, so a guard that uses both runs them once per request.
    """
    detector = build_detector(spec.name, spec.params, preset=spec.preset, seed=seed, device=device, progress=progress)
    params = detector.get_params()
    # Parameters that only change scoring (SAME's alpha) share one fitted detector.
    scoring_only = {k: params.pop(k) for k in detector.SCORING_ONLY_PARAMS if k in params}
    key = cache_key(kind=spec.name, victim=victim.weights_sha256, n=len(fit_data), params=params,
                    architecture=preset_architecture(params), preset=spec.preset,
                    outlier=(spec.outlier_data, OUTLIER_SPLIT), seed=seed)
    path = cache / f"detector-{spec.name}-{key}"
    can_cache = isinstance(detector, SaveableDetector)
    if fitted is not None and path in fitted:
        base, fit_seconds = fitted[path]
        shared = copy.copy(base)
        for name, value in scoring_only.items():
            setattr(shared, name, value)
        return shared, fit_seconds
    if can_cache and path.is_dir():
        try:
            loaded = type(detector).load(path, victim, device=device)
            for name, value in scoring_only.items():
                setattr(loaded, name, value)
            meta = json.loads((path / "bench.json").read_text())
            logger.info("Reusing the cached %s in %s", spec.label, path)
            if fitted is not None:
                fitted[path] = (loaded, float(meta["fit_seconds"]))
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
        if fitted is not None:
            fitted[path] = (detector, fit_seconds)
    return detector, fit_seconds


@dataclass
class _Run:
    """What the steps of one (victim dataset, seed) share."""

    config: BenchConfig
    cache: Path
    plots: Path
    data_dir: str | None
    device: str
    progress: bool | None
    echo: Callable[[str], None]
    dataset: str
    seed: int
    test: ImageDataset
    halves: dict[str, ImageDataset]
    fit_data: ImageDataset
    held_out: ImageDataset
    victim: Victim
    alarm_calibration: ImageDataset   # half of the test split: benign images neither victim nor detectors saw
    alarm_benign: ImageDataset        # the other half: where benign clients of the alarm study draw from

    @property
    def where(self) -> str:
        return f"[{self.dataset} seed {self.seed}]"

    @property
    def stream_queries(self) -> int:
        return 0 if self.config.alarms is None else self.config.alarms.stream_queries


def _build_attack(spec: AttackSpec, run: _Run) -> Any:
    """The attack of ``spec`` with the data it holds (proxy pool, seed images) and the run's seed."""
    role = attack_data_role(spec.name)
    if role == "proxy":
        data = (_dataset(spec.proxy, "train", run.halves, run.data_dir),)
    elif role == "seeds":
        data = (_dataset(spec.seed_data or ATTACKER_HALF, "train", run.halves, run.data_dir),)
    elif role == "proxy+seeds":  # the adaptive attackers: a proxy pool and in-distribution images
        data = (_dataset(spec.proxy, "train", run.halves, run.data_dir),
                _dataset(spec.seed_data or ATTACKER_HALF, "train", run.halves, run.data_dir))
    else:
        data = ()
    kwargs = {"seed": run.seed, "device": run.device, "progress": run.progress, **spec.params}
    return build_attack(spec.name, *data, **kwargs)


def _attack_queries(spec: AttackSpec, run: _Run) -> dict[str, Any]:
    """Run one attack (or load its cached result): its last ``B`` queries, its first queries (the stream
    the alarm study reads) and its substitute's quality."""
    scored, stream = run.config.scored_queries, min(run.stream_queries, spec.budget)
    key = cache_key(kind="attack", victim=run.victim.weights_sha256, name=spec.name, budget=spec.budget,
                    proxy=spec.proxy, seed_data=spec.seed_data, output=spec.output, params=spec.params,
                    scored=scored, seed=run.seed, **({"stream": stream} if stream else {}))
    path = run.cache / f"attack-{spec.label.replace(' ', '_').replace('/', '_')}-{key}"
    if (path / "queries.safetensors").is_file() and (path / "result.json").is_file():
        logger.info("Reusing the cached %s queries in %s", spec.label, path)
        result = json.loads((path / "result.json").read_text())
        tensors = safetensors.torch.load_file(str(path / "queries.safetensors"))
        return {**result, "queries_tensor": tensors["queries"], "stream_tensor": tensors.get("stream")}
    attack = _build_attack(spec, run)
    api = Guard(run.victim, output=spec.output, record_inputs=True, keep_decisions=0)
    logger.info("Running %s with a budget of %d queries", spec.label, spec.budget)
    res = attack.run(api, spec.budget, victim=run.victim, test_data=run.test)
    sent = api.inputs(res.client)
    tensors = {"queries": sent[-scored:].clone()}
    if stream:
        tensors["stream"] = sent[:stream].clone()
    result = {"queries_used": res.queries, "substitute_accuracy": res.test_accuracy, "fidelity": res.fidelity,
              "attack_seconds": res.seconds}
    path.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(path / "queries.safetensors"))
    (path / "result.json").write_text(json.dumps(result, indent=2))
    return {**result, "queries_tensor": tensors["queries"], "stream_tensor": tensors.get("stream")}


def _timed_scores(detector: Any, x: torch.Tensor) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    scores = detector.score(x)
    ms = 1000 * (time.perf_counter() - start) / len(x)
    return torch.as_tensor(scores).double().numpy(), ms


def _start_run(config: BenchConfig, dataset: str, seed: int, full_train: ImageDataset, test: ImageDataset,
               **common: Any) -> _Run:
    """Split the data for one seed and train (or load) the victim."""
    defender, attacker = full_train.split_off(0.5, seed=seed)
    fit_data, held_out = defender.split_off(0.1, seed=seed)
    victim = cached_victim(common["cache"], defender, test, arch=config.victim.arch, epochs=config.victim.epochs,
                           lr=config.victim.lr, seed=seed, device=common["device"], progress=common["progress"])
    alarm_benign, alarm_calibration = test.split_off(0.5, seed=seed + 1)
    run = _Run(config=config, dataset=dataset, seed=seed, test=test, halves={"attacker": attacker},
               fit_data=fit_data, held_out=held_out, victim=victim, alarm_calibration=alarm_calibration,
               alarm_benign=alarm_benign, **common)
    run.echo(f"{run.where} victim {config.victim.arch}: test accuracy {victim.test_accuracy:.4f}")
    return run


def _fit_detectors(run: _Run, benign_x: torch.Tensor) -> dict[str, tuple[DetectorSpec, Any, float, np.ndarray]]:
    """Every configured detector, fitted or loaded: label -> (spec, detector, fit seconds, benign scores)."""
    detectors, fitted = {}, {}  # type: ignore[var-annotated]
    for spec in run.config.detectors:
        detector, fit_seconds = _fit_detector(spec, run.victim, run.fit_data, seed=run.seed, cache=run.cache,
                                              device=run.device, progress=run.progress, data_dir=run.data_dir,
                                              fitted=fitted)
        if getattr(detector, "needs_calibration", False):  # standardised terms: benign held-out statistics
            detector.calibrate(run.held_out.images)
        benign_scores, _ = _timed_scores(detector, benign_x)
        detectors[spec.label] = (spec, detector, fit_seconds, benign_scores)
        run.echo(f"{run.where} detector {spec.label}: fitted ({fit_seconds:.0f} s)")
    return detectors


def _detection_records(run: _Run, aspec: AttackSpec, attack: dict[str, Any], detectors: dict[str, Any],
                       benign_x: torch.Tensor) -> list[dict[str, Any]]:
    """One record per detector for one attack (AUROC, AUPR, ...), and the ROC plots of the first seed."""
    records, curves = [], {}
    for label, (spec, detector, fit_seconds, benign_scores) in detectors.items():
        attack_scores, ms = _timed_scores(detector, attack["queries_tensor"])
        m = detection_metrics(benign_scores, attack_scores)
        curves[label] = (benign_scores, attack_scores)
        alarm = {}
        if isinstance(detector, PRADADetector):  # PRADA's own per-client alarm
            alarm = {"alarm_after_attack": detector.queries_until_alarm(attack["queries_tensor"]),
                     "alarm_after_benign": detector.queries_until_alarm(benign_x)}
        records.append({
            "dataset": run.dataset, "victim_accuracy": run.victim.test_accuracy, "attack": aspec.label,
            "budget": aspec.budget, "seed": run.seed, "queries_used": attack["queries_used"],
            "substitute_accuracy": attack["substitute_accuracy"], "fidelity": attack["fidelity"],
            "scored_queries": run.config.scored_queries, "detector": label,
            "needs": ", ".join(sorted(getattr(detector, "NEEDS", ()))) or "nothing (black box)",
            "auroc": m.auroc, "aupr": m.aupr, "fpr95": m.fpr95, "tpr_at_1fpr": m.tpr_at_1fpr,
            "fit_seconds": fit_seconds, "score_ms_per_query": ms, **alarm,
        })
    if run.seed == run.config.seeds[0]:
        stem = f"{run.dataset}-{aspec.label}".replace(" ", "_").replace("/", "_")
        plot_roc(curves, run.plots / f"roc-{stem}.png", f"{run.dataset}: {aspec.label}")
        first = next(iter(curves))
        plot_histograms(*curves[first], run.plots / f"hist-{stem}-{first}.png", f"{first} scores: {aspec.label}")
    return records


def _alarm_records(run: _Run, streams: dict[str, dict[str, Any]], detectors: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-client alarm study: queries until alarm per attack stream, benign false alarms."""
    spec = run.config.alarms
    assert spec is not None
    sets = alarm_sets(spec.detectors, spec.combination, spec.stream)
    study = AlarmStudy(run.victim, {label: detectors[label][1] for label in set(spec.detectors + spec.combination)},
                       run.alarm_calibration.images, sets, delta=spec.delta, seed=run.seed,
                       conditional=spec.calibration_conditional, stream_pool_size=spec.stream_pool_size)
    base = {"dataset": run.dataset, "seed": run.seed, "delta": spec.delta,
            "calibration_conditional": spec.calibration_conditional, "stream_pool_size": spec.stream_pool_size}
    records = []
    for label, attack in streams.items():
        found = study.queries_until_alarm(attack["stream_tensor"])
        records += [{**base, "kind": "attack", "attack": label, "alarm_set": name, "alarm_query": q,
                     "stream_length": len(attack["stream_tensor"]), "substitute_accuracy": attack["substitute_accuracy"]}
                    for name, q in found.items()]
        run.echo(f"{run.where} alarms on {label}: " + ", ".join(f"{n} {q or '-'}" for n, q in found.items()))
    benign = study.benign_false_alarms(run.alarm_benign, clients=spec.benign_clients, queries=spec.client_queries)
    records += [{**base, "kind": "benign", "alarm_set": name, **row} for name, row in benign.items()]
    run.echo(f"{run.where} alarms on benign clients: "
             + ", ".join(f"{n} {r['alarmed']}/{r['clients']} (+{r['skewed_alarmed']} skewed)" for n, r in benign.items()))
    return records


def _alarm_scorers(run: _Run, detectors: dict[str, Any]) -> dict[str, Any]:
    """The detectors the guard's alarms combine (the ``combination``, else every alarm detector);
    the first of them is also the guard's per-query detector."""
    spec = run.config.alarms
    assert spec is not None
    return {label: detectors[label][1] for label in spec.combination or spec.detectors}


def _guard_for(run: _Run, detectors: dict[str, Any], policy: str, output: str) -> Guard:
    """The protected model of the study: per-client alarms over the combination (and the stream test)
    calibrated on the held-out images; ``policy``'s action on every query of an alarmed client, and on
    single queries before the alarm only when ``per_query_fpr`` sets SAME's threshold."""
    spec = run.config.alarms
    assert spec is not None
    return alarm_guard(run.victim, _alarm_scorers(run, detectors), run.alarm_calibration.images, delta=spec.delta,
                       stream=spec.stream, seed=run.seed, policy=policy, output=output,
                       per_query_fpr=spec.per_query_fpr, conditional=spec.calibration_conditional,
                       stream_pool_size=spec.stream_pool_size)


def _extraction_records(run: _Run, detectors: dict[str, Any], plain: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each attack again, through the guard with each action after the alarm; benign accuracy alike."""
    spec = run.config.alarms
    assert spec is not None
    records = []
    for policy in spec.actions:
        for aspec in run.config.attacks:
            guard = _guard_for(run, detectors, policy, aspec.output)
            res = _build_attack(aspec, run).run(guard, aspec.budget, victim=run.victim, test_data=run.test)
            ev = guard.alarms.evidence(res.client)
            records.append({"dataset": run.dataset, "seed": run.seed, "kind": "extraction", "policy": policy,
                            "attack": aspec.label, "budget": aspec.budget,
                            "alarm_query": None if ev is None else ev.alarm_query,
                            "substitute_accuracy": res.test_accuracy, "fidelity": res.fidelity,
                            "unguarded_accuracy": plain[aspec.label]["substitute_accuracy"],
                            "unguarded_fidelity": plain[aspec.label]["fidelity"], "delta": spec.delta,
                            "expected_hashes": guard.stats(res.client).expected_hashes,
                            "per_query_fpr": spec.per_query_fpr})
            run.echo(f"{run.where} through the guard ({policy} after the alarm) {aspec.label}: substitute accuracy "
                     f"{res.test_accuracy:.4f} (alarm at query {records[-1]['alarm_query'] or '-'})")
        records.append(_benign_accuracy(run, _guard_for(run, detectors, policy, "probabilities"), policy, spec.delta))
    return records


def _alarm_cost(run: _Run, detectors: dict[str, Any], n: int = 200) -> dict[str, Any]:
    """Median milliseconds per single-image query through the guard (monitor policy): SAME alone, and
    with the per-client alarms (the combination's other scorers, p-values, martingales, stream test),
    the two measured alternately."""
    x = run.test.images[:n]
    plain = Guard(run.victim, next(iter(_alarm_scorers(run, detectors).values())), "monitor", keep_decisions=0,
                  history=False)
    guarded = _guard_for(run, detectors, "monitor", "probabilities")
    times = alternate_median_ms({"guard": plain, "guard_with_alarms": guarded}, x)  # query by query
    run.echo(f"{run.where} cost per single-image query: {times['guard']:.2f} ms, with alarms "
             f"{times['guard_with_alarms']:.2f} ms")
    return {"dataset": run.dataset, "seed": run.seed, "kind": "cost", "delta": run.config.alarms.delta,
            "ms_guard": times["guard"], "ms_guard_with_alarms": times["guard_with_alarms"]}


def _benign_accuracy(run: _Run, guard: Guard, policy: str, delta: float, n: int = 2000) -> dict[str, Any]:
    """Accuracy a normal user gets through ``guard`` on ``n`` test images (a refused answer counts as
    wrong), next to the bare victim's on the same images."""
    pool = run.alarm_benign
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(run.seed + 20_000))[:n]
    x, y = pool.images[order], pool.labels[order]
    right = bare = 0
    for start in range(0, len(x), 100):
        verdict = guard.protect(x[start:start + 100], "benign-accuracy")
        truth = y[start:start + 100]
        right += int(((verdict.probabilities.argmax(1) == truth) & ~verdict.refused).sum())
        bare += int((run.victim(x[start:start + 100]).argmax(1) == truth).sum())
    ev = guard.alarms.evidence("benign-accuracy") if guard.alarms is not None else None
    return {"dataset": run.dataset, "seed": run.seed, "kind": "benign-accuracy", "policy": policy, "delta": delta,
            "bare_accuracy": bare / len(x), "guarded_accuracy": right / len(x),
            "alarmed": bool(ev is not None and ev.alarmed), "queries": len(x)}


def _run_seed(run: _Run, detection_only: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Detection records and alarm records of one (dataset, seed) (none with ``detection_only``)."""
    benign_api = Guard(run.victim, record_inputs=True, keep_decisions=0)
    benign_client = NormalUser(run.test, seed=run.seed + 10_000, progress=False).run(
        benign_api, run.config.scored_queries).client
    benign_x = benign_api.inputs(benign_client)
    detectors = _fit_detectors(run, benign_x)
    records, streams = [], {}
    for aspec in run.config.attacks:
        attack = _attack_queries(aspec, run)
        run.echo(f"{run.where} attack {aspec.label}: {attack['queries_used']} queries, substitute accuracy "
                 f"{attack['substitute_accuracy']:.4f}, fidelity {attack['fidelity']:.4f}")
        records += _detection_records(run, aspec, attack, detectors, benign_x)
        streams[aspec.label] = attack
    alarms = []
    if detection_only:
        return records, alarms
    if run.config.alarms is not None:
        alarms = _alarm_records(run, streams, detectors) + [_alarm_cost(run, detectors)]
        alarms += _extraction_records(run, detectors, streams)
    if run.config.key_sweep is not None:  # the slow-and-wide study (issue 13)
        from .adaptive_study import key_sweep_records

        alarms += key_sweep_records(run, detectors, run.config.key_sweep, streams)
    return records, alarms


def _seed_results_path(config: BenchConfig, dataset: str, seed: int, cache: Path, detection_only: bool = False) -> Path:
    """Where one (dataset, seed)'s records are kept: keyed by everything in the config but its seeds
    (a detection-only pass has files of its own, ``results-detection-...``, never read as a full seed)."""
    kept = {k: v for k, v in config.to_dict().items() if k not in ("name", "seeds", "source")}
    if kept.get("alarms") and kept["alarms"].get("stream_pool_size") is None:
        del kept["alarms"]["stream_pool_size"]  # the default: the keys of runs saved before the option stay valid
    kind = "seed-results-detection" if detection_only else "seed-results"
    key = cache_key(kind=kind, config=kept, dataset=dataset, seed=seed)
    return cache / f"results-{'detection-' if detection_only else ''}{dataset}-seed{seed}-{key}.json"


def _saved_seed_results(path: Path, echo: Callable[[str], None],
                        where: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
    """The records an earlier run of the same config saved in ``path``, or ``None``."""
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        records, alarms = saved["records"], saved["alarms"]
    except (ValueError, KeyError, TypeError) as exc:
        logger.warning("Ignoring the saved results in %s: %s", path, exc)
        return None
    echo(f"{where} results reused from {path}")
    return records, alarms


def _seed_results(config: BenchConfig, dataset: str, seed: int, full_train: ImageDataset, test: ImageDataset,
                  reuse: bool, detection_only: bool = False,
                  **common: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One (dataset, seed)'s detection and alarm records: computed, or read back from an earlier run of
    the same config (``reuse``; then nothing is trained, not even the victim), so that an interrupted
    run resumes at the first unfinished seed."""
    path = _seed_results_path(config, dataset, seed, common["cache"], detection_only)
    saved = _saved_seed_results(path, common["echo"], f"[{dataset} seed {seed}]") if reuse else None
    if saved is None and detection_only and reuse:  # a full seed's detection records are the same rows
        full = _saved_seed_results(_seed_results_path(config, dataset, seed, common["cache"]), common["echo"],
                                   f"[{dataset} seed {seed}]")
        saved = None if full is None else (full[0], [])
    if saved is not None:
        return saved
    run = _start_run(config, dataset, seed, full_train, test, **common)
    records, alarms = _run_seed(run, detection_only)
    path.write_text(json.dumps({"records": records, "alarms": alarms}, default=plain_json))
    return records, alarms


def run_benchmark(config: BenchConfig, outdir: str | Path, *, data_dir: str | None = None, device: str = "cpu",
                  progress: bool | None = None, echo: Callable[[str], None] | None = None,
                  reuse_results: bool = True, detection_only: bool = False) -> list[dict[str, Any]]:
    """Run every cell of ``config``; write results, report and plots to ``outdir``; return the records.

    ``detection_only`` stops each seed after its detection rows (no ``[alarms]`` study, no key
    sweep): the victims, detectors and attack queries it trains are the very cache entries a full
    run of the same config reads (the attacks keep the first queries the alarm study needs), so a
    full run afterwards starts at the alarm study. Its per-seed results are saved apart.

    ``echo`` receives one line per finished step (data, victim, each detector, each attack, the
    alarm study, the report); by default a :class:`~sameguard.steps.StepLog` logs it with the
    elapsed time. Each (dataset, seed)'s records are saved in the cache as soon as they are done;
    with ``reuse_results`` (default) a later run of the same config reads them back instead of
    scoring again (``False``: score again, reusing only the cached victims, detectors and attacks).
    """
    echo = echo if echo is not None else StepLog()
    out = Path(outdir)
    common = {"cache": out / "cache", "plots": out / "plots", "data_dir": data_dir, "device": device,
              "progress": progress, "echo": echo}
    common["cache"].mkdir(parents=True, exist_ok=True)
    common["plots"].mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    alarms: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for dataset in config.datasets:
        full_train = load_dataset(dataset, "train", data_dir=data_dir)
        test = load_dataset(dataset, "test", data_dir=data_dir)
        echo(f"[{dataset}] data: {len(full_train)} training and {len(test)} test images")
        for seed in config.seeds:
            seed_records, seed_alarms = _seed_results(config, dataset, seed, full_train, test, reuse_results,
                                                      detection_only, **common)
            records += seed_records
            alarms += seed_alarms
    notes = [
        f"Profile `{config.name}` ({config.source}); seeds {list(config.seeds)}; B = {config.scored_queries} attack "
        f"queries (the last B each attack sent) against B normal-user queries from the test split; total run time "
        f"{time.perf_counter() - t0:.0f} s." + (" Detection only: the per-client alarm study was not run."
                                                if detection_only and config.alarms is not None else ""),
        "Victim and detectors are trained on one half of the train split; the other half is the attacker's "
        "in-distribution data (JBDA seeds, the in-distribution Knockoff row).",
    ]
    write_results(records, out, title=f"sameguard benchmark: {config.name}", config=config.to_dict(), notes=notes,
                  alarms=alarms)
    echo(f"report: {len(records)} rows written to {out}")
    return records
