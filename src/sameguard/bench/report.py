"""Benchmark outputs: ``results.json``, ``results.csv``, a Markdown report, ROC curves and histograms.

The runner produces one :class:`DetectionRecord`-like dict per (victim dataset, attack, detector,
seed); this module aggregates them over seeds (mean ± std) and writes the files. Plots use
matplotlib's non-interactive ``Agg`` back-end.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .alarm_study import median_range

logger = logging.getLogger(__name__)

__all__ = ["write_results", "markdown_report", "aggregate", "plot_roc", "plot_histograms", "mean_std"]

#: Columns of ``results.csv``, in order.
CSV_FIELDS = (
    "dataset", "victim_accuracy", "attack", "budget", "seed", "queries_used", "substitute_accuracy", "fidelity",
    "scored_queries", "detector", "needs", "auroc", "aupr", "fpr95", "tpr_at_1fpr", "fit_seconds", "score_ms_per_query",
    "alarm_after_attack", "alarm_after_benign",
)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (0 for one value); NaN for none."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std())


def _fmt(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "–"
    if len(values) > 1:
        return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f}"


def aggregate(records: Iterable[Mapping[str, Any]], keys: Sequence[str]) -> dict[tuple, list[Mapping[str, Any]]]:
    """Group records by the values of ``keys`` (insertion order kept)."""
    groups: dict[tuple, list[Mapping[str, Any]]] = defaultdict(list)
    for rec in records:
        groups[tuple(rec[k] for k in keys)].append(rec)
    return dict(groups)


def markdown_report(records: Sequence[Mapping[str, Any]], title: str = "sameguard benchmark",
                    notes: Sequence[str] = ()) -> str:
    """One section per victim dataset: an attack table (substitute quality) and a detection table.

    Detection table rows: detector (with what it needs); columns: AUROC / AUPR / FPR95 per attack,
    in percent, mean ± std over seeds.
    """
    lines = [f"# {title}", ""]
    lines += [f"{n}" for n in notes]
    if notes:
        lines.append("")
    for (dataset,), recs in aggregate(records, ["dataset"]).items():
        attacks = list(dict.fromkeys(r["attack"] for r in recs))
        detectors = list(dict.fromkeys(r["detector"] for r in recs))
        victim_acc = [r["victim_accuracy"] for r in aggregate(recs, ["seed"]).values() for r in r[:1]]
        lines += [f"## Victim: {dataset} (test accuracy {_fmt(victim_acc)} %)", ""]
        lines += ["### The attacks", "",
                  "| attack | budget | queries used | scored | substitute accuracy % | fidelity % |",
                  "|---|---|---|---|---|---|"]
        for attack in attacks:
            per_seed = [g[0] for g in aggregate([r for r in recs if r["attack"] == attack], ["seed"]).values()]
            first = per_seed[0]
            lines.append(
                f"| {attack} | {first['budget']} | {first['queries_used']} | {first['scored_queries']} | "
                f"{_fmt([r['substitute_accuracy'] for r in per_seed])} | {_fmt([r['fidelity'] for r in per_seed])} |"
            )
        lines += ["", "### Detection (AUROC / AUPR / FPR95, %; attack queries = positives)", ""]
        lines.append("| detector | needs | " + " | ".join(attacks) + " |")
        lines.append("|---|---|" + "---|" * len(attacks))
        for det in detectors:
            cells = []
            needs = ""
            for attack in attacks:
                rs = [r for r in recs if r["detector"] == det and r["attack"] == attack]
                if not rs:
                    cells.append("–")
                    continue
                needs = rs[0].get("needs", "")
                cells.append(" / ".join(_fmt([r[m] for r in rs]) for m in ("auroc", "aupr", "fpr95")))
            lines.append(f"| {det} | {needs or '–'} | " + " | ".join(cells) + " |")
        alarm_dets = [d for d in detectors if any("alarm_after_attack" in r for r in recs if r["detector"] == d)]
        for det in alarm_dets:
            lines += ["", f"### {det}: queries until the per-client alarm (– = no alarm within the B scored queries)", "",
                      "| attack | attack stream, per seed | benign stream, per seed |", "|---|---|---|"]
            for attack in attacks:
                rs = [r for r in recs if r["detector"] == det and r["attack"] == attack]
                show = lambda key: ", ".join("–" if r.get(key) is None else str(r[key]) for r in rs)  # noqa: E731
                lines.append(f"| {attack} | {show('alarm_after_attack')} | {show('alarm_after_benign')} |")
        lines += ["", "### Cost", "", "| detector | fit time (s) | scoring (ms / query) |", "|---|---|---|"]
        for det in detectors:
            rs = [r for r in recs if r["detector"] == det]
            fit = mean_std([r.get("fit_seconds") or math.nan for r in rs])[0]
            ms = mean_std([r.get("score_ms_per_query") or math.nan for r in rs])[0]
            lines.append(f"| {det} | {'–' if math.isnan(fit) else f'{fit:.1f}'} | {'–' if math.isnan(ms) else f'{ms:.3f}'} |")
        lines.append("")
    return "\n".join(lines)


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike, title: str) -> Path:
    """ROC curves, one per detector: ``{name: (benign_scores, attack_scores)}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (benign, attack) in curves.items():
        labels = np.r_[np.zeros(len(benign)), np.ones(len(attack))]
        scores = np.r_[benign, attack]
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"{name} ({roc_auc_score(labels, scores):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="false-positive rate (benign flagged)", ylabel="true-positive rate (attack flagged)", title=title)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_histograms(benign: np.ndarray, attack: np.ndarray, path: str | os.PathLike, title: str) -> Path:
    """Overlaid score histograms of benign and attack queries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    both = np.r_[benign, attack]
    bins = np.linspace(np.min(both), np.max(both), 50) if np.ptp(both) > 0 else 10
    ax.hist(benign, bins=bins, alpha=0.6, label="benign", density=True)
    ax.hist(attack, bins=bins, alpha=0.6, label="attack", density=True)
    ax.set(xlabel="score (larger = more suspicious)", ylabel="density", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def extraction_report(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown table: each attack through the guard with an action after the alarm, next to unguarded."""
    rows = [r for r in records if r["kind"] == "extraction"]
    if not rows:
        return []
    fpr = rows[0].get("per_query_fpr", 0.01)
    when = ("every query after the client's alarm" if fpr is None
            else f"single queries at {100 * fpr:g} % FPR, and every query after the client's alarm")
    lines = ["", f"### Extraction through the guard (the action on {when}); substitute accuracy %, mean over seeds",
             "",
             "| action | attack | budget | unguarded | through the guard | fidelity (guarded) | alarm at query | "
             "keys for the whole budget | proof-of-work billed (hashes) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (policy, attack), rs in aggregate(rows, ("policy", "attack")).items():
        alarms = [r["alarm_query"] for r in rs]
        budget = rs[0]["budget"]
        keys = [1 if q is None else math.ceil(budget / max(q - 1, 1)) for q in alarms]
        lines.append(f"| {policy} | {attack} | {budget} | {_fmt([r['unguarded_accuracy'] for r in rs])} | "
                     f"{_fmt([r['substitute_accuracy'] for r in rs])} | {_fmt([r['fidelity'] for r in rs])} | "
                     f"{median_range(alarms, budget)} | {max(keys)} | "
                     f"{np.mean([r.get('expected_hashes', 0.0) for r in rs]):.3g} |")
    for r in (r for r in records if r["kind"] == "benign-accuracy"):
        lines.append(f"\nNormal user through the guard ({r['policy']}, seed {r['seed']}): accuracy "
                     f"{100 * r['guarded_accuracy']:.1f} % on {r['queries']} test images, bare victim "
                     f"{100 * r['bare_accuracy']:.1f} %; alarmed: {'yes' if r['alarmed'] else 'no'}.")
    lines.append("\nKeys for the whole budget: an attacker spreading its budget over API keys gets about "
                 "(alarm query - 1) answers per key before each key is alarmed.")
    for r in (r for r in records if r["kind"] == "cost"):
        lines.append(f"\nMedian cost per single-image query through the guard (seed {r['seed']}): {r['ms_guard']:.2f} ms "
                     f"with SAME alone, {r['ms_guard_with_alarms']:.2f} ms with the per-client alarms "
                     f"(+{100 * (r['ms_guard_with_alarms'] / r['ms_guard'] - 1):.0f} %).")
    return lines


def alarm_report(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown tables of the per-client alarm study (see :mod:`sameguard.bench.alarm_study`)."""
    alarms = [r for r in records if r["kind"] in ("attack", "benign")]
    if not alarms:
        return extraction_report(records)
    delta = alarms[0]["delta"]
    eta = alarms[0].get("calibration_conditional")  # absent in records saved before the option
    p_values = "" if eta is None else f", calibration-conditional p-values at eta = {eta:g}"
    attacks = list(dict.fromkeys(r["attack"] for r in alarms if r["kind"] == "attack"))
    sets = list(dict.fromkeys(r["alarm_set"] for r in alarms))
    length = {a: max(r["stream_length"] for r in alarms if r.get("attack") == a) for a in attacks}
    lines = ["", f"### Per-client alarms (delta = {delta:g}{p_values}): queries until alarm, median [range] over seeds", "",
             "Attack streams are each attack's first queries in order (`> n`: not alarmed within its n queries). "
             "Calibration: one half of the test split (unseen by victim and detectors). Benign: random clients "
             "drawn from the other half, and class-skewed clients (one per class and per pair of classes); the "
             "guarantee bounds the expected random-client false alarms by delta x clients.", "",
             "| alarm set | " + " | ".join(f"{a} (of {length[a]})" for a in attacks)
             + " | benign clients alarmed | bound | class-skewed alarmed |",
             "|---|" + "---:|" * (len(attacks) + 3)]
    for name in sets:
        rows = [r for r in alarms if r["alarm_set"] == name]
        cells = [median_range([r["alarm_query"] for r in rows if r.get("attack") == a], length[a]) for a in attacks]
        benign = [r for r in rows if r["kind"] == "benign"]
        alarmed, clients = sum(r["alarmed"] for r in benign), sum(r["clients"] for r in benign)
        skewed = sum(r["skewed_alarmed"] for r in benign), sum(r["skewed_clients"] for r in benign)
        bound = sum(r["bound"] for r in benign)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {alarmed} / {clients} | {bound:g} | "
                     f"{skewed[0]} / {skewed[1]} |")
    kinds = sorted({k for r in alarms if r["kind"] == "benign" for k in r["skewed_kinds"]})
    if kinds:
        lines += ["", "Class-skewed benign clients alarmed by some set (true classes): " + ", ".join(kinds) + "."]
    return lines + extraction_report(records)


def plain_json(value: Any) -> Any:
    """``json.dumps`` fallback for records: numpy scalars and arrays as Python numbers and lists,
    anything else as its text."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def write_results(records: Sequence[Mapping[str, Any]], outdir: str | os.PathLike, *, title: str,
                  config: Mapping[str, Any], notes: Sequence[str] = (),
                  alarms: Sequence[Mapping[str, Any]] = ()) -> dict[str, Path]:
    """Write ``results.json`` (config, records, alarm records), ``results.csv`` and ``report.md`` to ``outdir``."""
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "csv": out / "results.csv", "report": out / "report.md"}
    paths["json"].write_text(json.dumps({"config": config, "records": list(records), "alarms": list(alarms)},
                                        indent=2, default=plain_json) + "\n")
    with open(paths["csv"], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for rec in records:
            writer.writerow(rec)
    from .adaptive_study import key_sweep_report

    report = (markdown_report(records, title=title, notes=notes) + "\n".join(alarm_report(alarms))
              + "\n".join(key_sweep_report(alarms)))
    paths["report"].write_text(report + "\n")
    logger.info("Wrote %s", ", ".join(str(p) for p in paths.values()))
    return paths
