"""The scaling study's report: ``same-at-scale.md`` with its tables and a plot, from ``study.json``."""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .same_study import AUTHORS, MAX_COST_RATIO, MAX_FIT_SECONDS, SCALING_AXES, SWEEP_SCORINGS, choose_default
from .validation_anomalies import VALIDATION_KINDS

logger = logging.getLogger(__name__)

__all__ = ["write_study_report", "study_tables", "compute_trends", "trend_table", "plot_axes", "paper_fit_seconds",
           "PAPER_EPOCHS", "GOALS"]

#: The authors' MAE training schedule (epochs), for the fit time the trends extrapolate to.
PAPER_EPOCHS = 500


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


def _mean_fit(rs: Sequence[Mapping[str, Any]]) -> float:
    return float(np.mean([r["fit_seconds"] for r in rs]))


def _axis_points(groups: dict[tuple[str, str], list[Mapping[str, Any]]], axis: str, scoring: str,
                 value_of: Callable[[Sequence[Mapping[str, Any]]], float]) -> list[tuple[float, float]]:
    """``(axis value, value_of(records))`` of the axis's fits that were run with ``scoring``, in axis order."""
    points = []
    for cand, x in SCALING_AXES[axis]:
        rs = groups.get((cand, scoring))
        if rs:
            points.append((float(x if x is not None else rs[0].get("defender_images", np.nan)), value_of(rs)))
    return sorted(p for p in points if np.isfinite(p[0]))


def plot_axes(records: Sequence[Mapping[str, Any]], path: str | os.PathLike, scoring: str = AUTHORS) -> Path | None:
    """One panel per scaling axis (:data:`SCALING_AXES`): AUROC per attack and the validation anomalies'
    worst case against the factor, MSP dashed; ``None`` when no axis has two fits with ``scoring``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(records)
    attacks = list(records[0]["attacks"])
    series = {a: (lambda rs, a=a: 100 * float(np.mean([r["attacks"][a] for r in rs]))) for a in attacks}
    series["validation, worst kind"] = lambda rs: 100 * float(np.mean([r["validation_min"] for r in rs]))
    axes = [a for a in SCALING_AXES if len(_axis_points(groups, a, scoring, _mean_fit)) >= 2]
    if not axes:
        return None
    cols = min(3, len(axes))
    rows = -(-len(axes) // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    msp = groups.get(("MSP", "msp"))
    for ax, axis in zip(grid.flat, axes):
        for label, value_of in series.items():
            pts = _axis_points(groups, axis, scoring, value_of)
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            if msp and label in attacks:
                ax.axhline(value_of(msp), color=line.get_color(), linestyle="--", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ticks = [p[0] for p in _axis_points(groups, axis, scoring, _mean_fit)]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_title(axis, fontsize=8)
        ax.set_ylim(0, 102)
        ax.tick_params(labelsize=7)
    for ax in list(grid.flat)[len(axes):]:
        ax.axis("off")
    grid.flat[0].set_ylabel("AUROC % (dashed: MSP)")
    grid.flat[0].legend(fontsize=6)
    fig.suptitle(f"SAME ({scoring} scoring), one factor at a time", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def paper_fit_seconds(records: Sequence[Mapping[str, Any]]) -> float | None:
    """The authors' schedule (:data:`PAPER_EPOCHS` epochs on every defender image) on this machine, by the
    fit time per image-epoch of the study's largest run of the authors' MAE (``None`` without one)."""
    groups = _groups(records)
    for cand, image_epochs in reversed(SCALING_AXES["the authors' MAE: image-epochs"]):
        rs = next((v for (c, _), v in groups.items() if c == cand), None)
        if rs and image_epochs and "defender_images" in rs[0]:
            return _mean_fit(rs) / image_epochs * PAPER_EPOCHS * rs[0]["defender_images"]
    return None


#: AUROCs are clipped to [LOGIT_CLIP, 1 - LOGIT_CLIP] before their log-odds are taken.
LOGIT_CLIP = 0.005


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(p, LOGIT_CLIP, 1.0 - LOGIT_CLIP)
    return np.log(p / (1.0 - p))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


#: Issue 10's goals for the default SAME, AUROC per attack label (on top of "at or above MSP").
GOALS: dict[str, float] = {"Knockoff (digits proxy)": 0.95, "DFME": 0.95, "JBDA": 0.80, "JBDA-TR": 0.80}


def compute_trends(records: Sequence[Mapping[str, Any]], scoring: str,
                   goals: Mapping[str, float] | None = None) -> dict[str, dict[str, float]]:
    """Per attack (but the in-distribution sanity check), a least-squares line of the AUROC's log-odds
    against log10(fit seconds) over every SAME fit scored with ``scoring`` (log-odds, so that the line
    stays within 0-100 % when extrapolated).

    Returns:
        attack -> ``slope`` (log-odds per tenfold fit time), ``r`` (Pearson, on the same scales),
        ``n`` (fits), ``msp`` and ``best`` (MSP's and the best fit's AUROC, %), ``target`` (%: MSP's AUROC,
        or the attack's goal in ``goals`` (AUROC in [0, 1] per attack label) when higher),
        ``reach_seconds`` (the fit time where the line meets the target: ``0`` when it is at or above it
        at the longest fit measured, ``inf`` when it is below there and flat or falling) and ``paper``
        (the line at :func:`paper_fit_seconds`, %; NaN without it). Fewer than 3 fits (or no MSP) give ``{}``.

    A crude, explicit extrapolation across architectures and budgets: fit time stands for compute.
    """
    groups = _groups(records)
    fits = [(rs, _mean_fit(rs)) for (cand, sc), rs in groups.items() if sc == scoring and cand != "MSP"]
    fits = [(rs, t) for rs, t in fits if t > 0]
    msp = groups.get(("MSP", "msp"))
    if len(fits) < 3 or not msp:
        return {}
    x = np.log10([t for _, t in fits])
    paper = paper_fit_seconds(records)
    out = {}
    for attack in (a for a in records[0]["attacks"] if "sanity" not in a):  # not the in-distribution check
        auroc = np.array([np.mean([r["attacks"][attack] for r in rs]) for rs, _ in fits])
        y = _logit(auroc)
        slope, intercept = np.polyfit(x, y, 1)
        msp_auroc = float(np.mean([r["attacks"][attack] for r in msp]))
        target = max(msp_auroc, (goals or {}).get(attack, 0.0))
        if slope * x.max() + intercept >= _logit(target):
            reach = 0.0
        elif slope <= 1e-9:
            reach = math.inf
        else:
            reach = float(10 ** ((_logit(target) - intercept) / slope))
        r = float(np.corrcoef(x, y)[0, 1]) if np.ptp(x) > 0 and np.ptp(y) > 0 else float("nan")
        out[attack] = {"slope": float(slope), "r": r, "n": len(fits), "msp": 100 * msp_auroc,
                       "target": 100 * target, "reach_seconds": reach,
                       "best": float(100 * auroc.max()),
                       "paper": 100 * _sigmoid(slope * math.log10(paper) + intercept) if paper else float("nan")}
    return out


def _seconds(s: float) -> str:
    if s == 0:
        return "reached"
    if not math.isfinite(s):
        return "never (flat or falling)"
    return f"{s:.0f} s" if s < 1e5 else f"{s:.1e} s ({s / 86400 / 365:.1g} years)" if s > 3e7 else f"{s:.1e} s"


def trend_table(records: Sequence[Mapping[str, Any]], scorings: Sequence[str]) -> list[str]:
    """Markdown lines: :func:`compute_trends` per scoring and attack, against MSP and issue 10's :data:`GOALS`."""
    paper = paper_fit_seconds(records)
    header = ("| scoring | attack | fits | best fit | MSP | target | log-odds per 10x fit time | r | fit time to reach "
              "the target on the line | the line at the authors' schedule |")
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for scoring in scorings:
        for attack, t in compute_trends(records, scoring, GOALS).items():
            at_paper = f"{t['paper']:.1f}" if math.isfinite(t["paper"]) else "n/a"
            lines.append(f"| {scoring} | {attack} | {t['n']} | {t['best']:.1f} | {t['msp']:.1f} | {t['target']:.1f} | "
                         f"{t['slope']:+.2f} | {t['r']:.2f} | {_seconds(t['reach_seconds'])} | {at_paper} |")
    if len(lines) == 2:
        return []
    note = (f"The authors' schedule ({PAPER_EPOCHS} epochs of their MAE on every defender image) would take about "
            f"{paper:.1e} s of fit time on this machine, by the study's largest run of their MAE."
            if paper else "No run of the authors' MAE with a known training set: no estimate of their schedule's fit time.")
    return [*lines, "", "The target is MSP's AUROC, or issue 10's goal for the attack when higher (95 % on Knockoff "
            "and DFME, 80 % on JBDA and JBDA-TR). " + note]


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
    # One factor at a time, and the trend over fit time: the scaling sweep's scorings (and the chosen one).
    scorings = [*SWEEP_SCORINGS, *([chosen[1]] if chosen and chosen[1] not in SWEEP_SCORINGS else [])]
    for scoring in scorings:
        slug = re.sub(r"[^a-z0-9]+", "-", scoring.lower()).strip("-")
        axes_plot = plot_axes(records, out.with_name(f"{out.stem}-axes-{slug}.png"), scoring=scoring)
        if axes_plot is not None:
            plots.append(f"![One factor at a time, {scoring} scoring]({axes_plot.name})")
    trends = trend_table(records, scorings)
    if trends:
        tables = [*tables, "", "### AUROC against fit time: a line in log-odds over the fits", "", *trends]
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
