"""The scaling study's report: ``same-at-scale.md`` with its tables and a plot, from ``study.json``."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .same_study import AUTHORS, MAX_COST_RATIO, MAX_FIT_SECONDS, choose_default
from .validation_anomalies import VALIDATION_KINDS

logger = logging.getLogger(__name__)

__all__ = ["write_study_report", "study_tables"]


def _groups(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["candidate"], r["scoring"]), []).append(r)
    return groups


def _pct(values: Sequence[float]) -> str:
    arr = 100 * np.asarray(values, dtype=np.float64)
    return f"{arr.mean():.1f}" if arr.size == 1 else f"{arr.mean():.1f} ± {arr.std():.1f}"


def _validation_table(groups: dict[tuple[str, str], list[Mapping[str, Any]]]) -> list[str]:
    lines = ["| fit | scoring | worst | mean | " + " | ".join(VALIDATION_KINDS) + " | fit (s) | ms / query |",
             "|---|---|---:|---:|" + "---:|" * len(VALIDATION_KINDS) + "---:|---:|"]
    for (cand, scoring), rs in groups.items():
        cells = [_pct([r["validation"][k] for r in rs]) for k in VALIDATION_KINDS]
        lines.append(f"| {cand} | {scoring} | {_pct([r['validation_min'] for r in rs])} | "
                     f"{_pct([r['validation_mean'] for r in rs])} | " + " | ".join(cells)
                     + f" | {np.mean([r['fit_seconds'] for r in rs]):.0f} | {np.mean([r['score_ms'] for r in rs]):.2f} |")
    return lines


def _attack_table(groups: dict[tuple[str, str], list[Mapping[str, Any]]], scorings: Sequence[str]) -> list[str]:
    attacks = list(next(iter(groups.values()))[0]["attacks"])
    lines = ["| fit | scoring | " + " | ".join(attacks) + " | MAE parameters | fit (s) |",
             "|---|---|" + "---:|" * len(attacks) + "---:|---:|"]
    for (cand, scoring), rs in groups.items():
        if cand != "MSP" and scoring not in scorings:
            continue
        cells = [_pct([r["attacks"][a] for r in rs]) for a in attacks]
        lines.append(f"| {cand} | {scoring} | " + " | ".join(cells)
                     + f" | {rs[0]['parameters']:,} | {np.mean([r['fit_seconds'] for r in rs]):.0f} |")
    return lines


def study_tables(records: Sequence[Mapping[str, Any]]) -> tuple[tuple[str, str] | None, list[str]]:
    """The chosen (fit, scoring) and the Markdown lines of the study's tables."""
    groups = _groups(records)
    chosen = choose_default(records)
    shown = list(dict.fromkeys(r["scoring"] for r in records))  # every scoring: reported, never used to choose
    lines = ["### Validation anomalies (AUROC %, benign = the other half of the defender's held-out images)", "",
             *_validation_table(groups), "",
             f"**Chosen by the rule:** {chosen[0]!s}, scoring {chosen[1]!s}." if chosen else
             "**No pair satisfies the rule's limits.**", "",
             "### The benchmark's attacks (AUROC %; the last B attack queries against B test-split queries)", "",
             *_attack_table(groups, shown)]
    return chosen, lines


def plot_scaling(records: Sequence[Mapping[str, Any]], path: str | os.PathLike, scoring: str = AUTHORS) -> Path:
    """AUROC per attack against fit time, one marker per fit, MSP as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(records)
    attacks = list(records[0]["attacks"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, attack in enumerate(attacks):
        pts = sorted((np.mean([r["fit_seconds"] for r in rs]), np.mean([r["attacks"][attack] for r in rs]))
                     for (cand, sc), rs in groups.items() if sc == scoring and cand != "MSP")
        line, = ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=attack)
        msp = groups.get(("MSP", "msp"))
        if msp:
            ax.axhline(100 * np.mean([r["attacks"][attack] for r in msp]), color=line.get_color(), linestyle="--",
                       linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("SAME fit time on 2 CPU cores (s, log scale)")
    ax.set_ylabel("AUROC % (dashed: MSP)")
    ax.set_title(f"SAME ({scoring} scoring) against fit budget")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_study_report(study_json: str | os.PathLike, out: str | os.PathLike, *, command: str,
                       notes: str | os.PathLike | None = None) -> Path:
    """Write the Markdown report (tables + the plot next to it) from a ``study.json``; the Markdown
    file ``notes`` (the reading of a run, written by a person) is appended when given."""
    data = json.loads(Path(study_json).read_text())
    records = data["records"]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    chosen, tables = study_tables(records)
    plot = plot_scaling(records, out.with_suffix(".png"))
    plots = [f"![AUROC against fit time, authors' scoring]({plot.name})"]
    if chosen and chosen[1] != AUTHORS:
        extra = plot_scaling(records, out.with_name(out.stem + "-chosen.png"), scoring=chosen[1])
        plots.append(f"![AUROC against fit time, the chosen scoring]({extra.name})")
    seeds = sorted({r["seed"] for r in records})
    text = [f"# SAME at CPU scale (profile `{data['profile']}`, seeds {seeds})", "",
            f"Produced by `{command}`.", "",
            "The rule, fixed before the run: among (fit, scoring) pairs whose fit takes at most "
            f"{MAX_FIT_SECONDS / 60:.0f} minutes and whose scoring costs at most {MAX_COST_RATIO}x the authors' "
            "scoring of the `cpu` preset, choose the highest worst-case AUROC over the validation anomalies "
            "(half-point bins), then the higher mean, then the shorter fit. Only the validation anomalies are "
            "read; the attacks below are reported, not used.", "",
            *tables, "", *plots, ""]
    if notes is not None:
        text += ["", Path(notes).read_text().strip(), ""]
    out.write_text("\n".join(text))
    logger.info("Wrote %s and %s", out, plot)
    return out
