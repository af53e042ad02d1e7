"""Inference options chosen by measurement: the victim's forward pass, SAME's scoring and the whole
guard, each timed per batch under every option in one run::

    python -m sameguard.bench.inference_options [--batch-sizes 1,16,64,256] [--repeat 20] [--out FILE]

Models: the ``conv3`` victim on 28x28x1 images and a SAME detector with the ``cpu`` preset's
architecture (the ``small`` MAE, a ``conv3`` auxiliary classifier), fitted for one epoch on 64 random
images: timing does not depend on the weights, so nothing is trained for long (``--victim`` /
``--detector`` time saved ones instead). Targets:

* ``victim``: ``Victim.predict_proba`` (the bare victim's forward pass and softmax);
* ``same``: ``SAMEDetector.score`` (MAE reconstruction, auxiliary classifier, victim, the score);
* ``guard``: ``Guard.protect`` with SAME and the ``monitor`` policy (all of the in-process guard).

Variants (``--variants``): ``eager`` (torch's default threads, the library as it runs today);
``threads-N`` (``torch.set_num_threads(N)`` around each call); ``inference-mode`` (each call inside
``torch.inference_mode()``; the library's own calls use ``torch.no_grad()``); ``compile``
(``torch.compile`` of the victim's network, the MAE's reconstruction and the auxiliary classifier,
plugged into copies of the victim and the detector, so the library's own scoring code runs around
them); ``onnxruntime`` (the same three networks exported with ``torch.onnx.export`` and run by ONNX
Runtime; needs the ``onnx`` and ``onnxruntime`` packages, which sameguard does not depend on: without
them the row says so). A variant that fails (e.g. ``torch.compile`` without a C compiler) is a row with
its error, not a crash.

Each round times one call of every (variant, target) at a batch size, the variants in a rotating
order, so that machine noise hits all alike; reported are medians over ``--repeat`` rounds (after a
warm-up call, which also compiles), the ratio to ``eager``, and the largest absolute difference of
the outputs (probabilities, scores) from ``eager``'s on the same images. Finally the issue's
in-process goal: at batch 256, ``Guard.protect``'s median over the bare victim's (eager).

Benchmarks are not tests: the numbers are measured here and now, on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..cli_checks import comma_ints
from ..compilation import DEFAULT_BACKEND
from .commands import _names
from .untrained import build_models

logger = logging.getLogger(__name__)

__all__ = ["OptionRow", "InferenceOptionsResult", "build_models", "measure_inference_options", "main", "TARGETS",
           "DEFAULT_VARIANTS"]

#: What is timed, in this order.
TARGETS = ("victim", "same", "guard")
#: The variants timed by default (``threads-N`` for any ``N`` is accepted too).
DEFAULT_VARIANTS = ("eager", "threads-1", "threads-2", "inference-mode", "compile", "onnxruntime")


@dataclass(frozen=True)
class OptionRow:
    """One (target, variant, batch): the median milliseconds per call, or the reason there is none.

    ``vs_eager``: this median over ``eager``'s (below 1: faster). ``max_abs_diff``: the largest
    absolute difference of the outputs from ``eager``'s on the same images.
    """

    target: str
    variant: str
    batch: int
    ms: float | None
    vs_eager: float | None
    max_abs_diff: float | None
    calls: int
    error: str | None = None


@dataclass
class InferenceOptionsResult:
    """The rows, the guard / victim ratios at the ratio batch, the configuration, and the report."""

    rows: list[OptionRow] = field(default_factory=list)
    guard_ratio: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "rows": [asdict(r) for r in self.rows], "guard_ratio": self.guard_ratio,
                "notes": self.notes}

    def markdown(self) -> str:
        c = self.config
        lines = [f"### Inference options (victim {c.get('victim')}, SAME {c.get('detector')}; {c.get('cpus')} CPUs, "
                 f"default torch threads {c.get('torch_threads')}; median of {c.get('repeat')} alternated rounds)", "",
                 "| target | batch | variant | ms per batch | vs eager | max abs diff vs eager |",
                 "|---|---:|---|---:|---:|---:|"]
        for r in self.rows:
            if r.error is not None:
                lines.append(f"| {r.target} | {r.batch} | {r.variant} | - | - | {r.error} |")
                continue
            ratio = "-" if r.vs_eager is None else f"{r.vs_eager:.2f}x"
            diff = "-" if r.max_abs_diff is None else f"{r.max_abs_diff:.1e}"
            lines.append(f"| {r.target} | {r.batch} | {r.variant} | {r.ms:.2f} | {ratio} | {diff} |")
        if self.guard_ratio:
            lines += ["", f"### Guard latency over the bare victim's at batch {c.get('ratio_batch')} (goal: at most 2x)",
                      "", "| guard variant | Guard.protect ms / bare victim ms (eager) |", "|---|---:|"]
            lines += [f"| {v} | {ratio:.2f}x |" for v, ratio in self.guard_ratio.items()]
        lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------- models
class _Reconstructor:
    """Stands for the detector's MAE with another ``reconstruct`` (compiled, ONNX Runtime); the rest delegates."""

    def __init__(self, original: nn.Module, reconstruct: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._original = original
        self.reconstruct = reconstruct

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)


class _Reconstruct(nn.Module):
    """``x -> MAE.reconstruct(x)`` as a module, for export."""

    def __init__(self, mae: nn.Module) -> None:
        super().__init__()
        self.mae = mae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mae.reconstruct(x)


class _OrtModule(nn.Module):
    """An ONNX Runtime session of a one-input, one-output network, called like the module it came from."""

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out)


def _ort_session(module: nn.Module, example: torch.Tensor, threads: int) -> Any:
    """Export ``module`` (batch dimension dynamic) and open it in ONNX Runtime with ``threads`` intra-op threads."""
    import onnxruntime as ort

    buf = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, (example,), buf, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])


def _swap_models(victim: Any, detector: Any, wrap_victim: Callable[[nn.Module], nn.Module],
                 wrap_reconstruct: Callable[[nn.Module], Callable[[torch.Tensor], torch.Tensor]],
                 wrap_aux: Callable[[nn.Module], Callable[[torch.Tensor], torch.Tensor]]) -> tuple[Any, Any]:
    """Shallow copies of ``victim`` and ``detector`` whose networks are replaced; the library's code stays."""
    v = copy.copy(victim)
    v.model = wrap_victim(victim.model)
    d = copy.copy(detector)
    d.reconstructor_ = _Reconstructor(detector.reconstructor_, wrap_reconstruct(detector.reconstructor_))
    d.aux_ = wrap_aux(detector.aux_)
    d.victim_ = v
    return v, d


def _variant_models(variant: str, victim: Any, detector: Any, *, compile_backend: str = DEFAULT_BACKEND) -> tuple[Any, Any]:
    """The (victim, detector) a variant runs; raises with a one-line reason when it cannot."""
    if variant == "compile":
        return _swap_models(victim, detector, lambda m: torch.compile(m, backend=compile_backend),
                            lambda mae: torch.compile(mae.reconstruct, backend=compile_backend),
                            lambda aux: torch.compile(aux, backend=compile_backend))
    if variant == "onnxruntime":
        import importlib.util

        missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
        if missing:
            raise RuntimeError(f"not run: {' and '.join(missing)} not installed (torch.onnx.export needs onnx; "
                               "sameguard depends on neither)")
        threads = torch.get_num_threads()
        example = torch.zeros(2, *victim.image_shape)
        sessions = {"victim": _ort_session(victim.model, example, threads),
                    "mae": _ort_session(_Reconstruct(detector.reconstructor_), example, threads),
                    "aux": _ort_session(detector.aux_, example, threads)}
        return _swap_models(victim, detector, lambda m: _OrtModule(sessions["victim"]),
                            lambda mae: _OrtModule(sessions["mae"]), lambda aux: _OrtModule(sessions["aux"]))
    return victim, detector


def _context(variant: str) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    """What each call of ``variant`` runs inside."""
    if variant.startswith("threads-"):
        n = int(variant.split("-", 1)[1])

        @contextlib.contextmanager
        def threads() -> Iterator[None]:
            before = torch.get_num_threads()
            torch.set_num_threads(n)
            try:
                yield
            finally:
                torch.set_num_threads(before)

        return threads
    if variant == "inference-mode":
        return torch.inference_mode
    return contextlib.nullcontext


def _check_variants(variants: Sequence[str]) -> list[str]:
    out = []
    for v in variants:
        ok = v in DEFAULT_VARIANTS or (v.startswith("threads-") and v[8:].isdigit() and int(v[8:]) >= 1)
        if not ok:
            raise ValueError(f"Unknown variant {v!r}; choose from {', '.join(DEFAULT_VARIANTS)} (or threads-N).")
        if v not in out:
            out.append(v)
    # eager first: the reference of every ratio and difference must be measured before the others
    return ["eager"] + [v for v in out if v != "eager"]


def _output(target: str, value: Any) -> torch.Tensor:
    return value.probabilities if target == "guard" else value


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"error: {type(exc).__name__}: {text[:160]}" if not text.startswith("not run") else text


# ---------------------------------------------------------------------------------------------- measuring
def measure_inference_options(victim: Any, detector: Any, *, batch_sizes: Sequence[int] = (1, 16, 64, 256),
                              repeat: int = 20, variants: Sequence[str] = DEFAULT_VARIANTS,
                              targets: Sequence[str] = TARGETS, ratio_batch: int = 256, compile_backend: str = DEFAULT_BACKEND,
                              seed: int = 0, echo: Callable[[str], None] = logger.info) -> InferenceOptionsResult:
    """Time every (target, variant) at every batch size (see the module docstring).

    Args:
        victim, detector: a :class:`~sameguard.victim.Victim` and a fitted, calibrated SAME detector for it.
        batch_sizes: images per call.
        repeat: timed rounds per batch size (the median is reported).
        variants: among :data:`DEFAULT_VARIANTS` or ``threads-N``; ``eager`` is always added.
        targets: among :data:`TARGETS`.
        ratio_batch: the batch of the guard / victim ratio (the largest batch when it is not timed).
        compile_backend: ``torch.compile``'s backend (``inductor``; ``aot_eager`` in quick tests).
    """
    from ..guard import Guard

    if repeat < 1 or not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError("repeat and every batch size must be positive integers.")
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ValueError(f"Unknown targets {bad!r}; choose from {', '.join(TARGETS)}.")
    variants = _check_variants(variants)
    result = InferenceOptionsResult(config={
        "sameguard": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "victim": getattr(victim, "arch", None),
        "detector": f"{type(detector).__name__} (MAE {getattr(detector, 'mae', None)})", "repeat": repeat,
        "batch_sizes": list(batch_sizes), "variants": variants, "targets": list(targets),
        "compile_backend": compile_backend})
    # Build each variant's callables once; a variant that cannot be built becomes error rows.
    calls: dict[str, dict[str, Callable[[torch.Tensor], Any]]] = {}
    failed: dict[str, str] = {}
    for variant in variants:
        try:
            v, d = _variant_models(variant, victim, detector, compile_backend=compile_backend)
            guard = Guard(v, d, "monitor", keep_decisions=0)
            calls[variant] = {"victim": v.predict_proba, "same": d.score,
                              "guard": lambda x, g=guard: g.protect(x, "bench")}
        except Exception as exc:  # noqa: BLE001 - reported as the variant's rows
            failed[variant] = _short(exc)
            logger.warning("variant %s unavailable: %s", variant, failed[variant])
    g = torch.Generator().manual_seed(seed)
    medians: dict[tuple[str, str, int], float] = {}
    for batch in batch_sizes:
        x = torch.rand(batch, *victim.image_shape, generator=g) * 2 - 1
        ok = [v for v in variants if v in calls]
        reference: dict[str, torch.Tensor] = {}
        errors: dict[tuple[str, str], str] = {}
        diffs: dict[tuple[str, str], float] = {}
        for variant in ok:  # warm-up (compiles), the outputs compared with eager's
            with _context(variant)():
                for target in targets:
                    try:
                        out = _output(target, calls[variant][target](x)).detach().float()
                    except Exception as exc:  # noqa: BLE001 - reported as a row
                        errors[(variant, target)] = _short(exc)
                        logger.warning("%s / %s at batch %d failed: %s", variant, target, batch, errors[(variant, target)])
                        continue
                    if variant == "eager":
                        reference[target] = out
                    if target in reference:
                        diffs[(variant, target)] = float((out - reference[target]).abs().max())
        times: dict[tuple[str, str], list[float]] = {(v, t): [] for v in ok for t in targets if (v, t) not in errors}
        for r in range(repeat):
            order = ok[r % len(ok):] + ok[:r % len(ok)]  # rotate: no variant always runs first
            for variant in order:
                with _context(variant)():
                    for target in targets:
                        if (variant, target) in times:
                            t0 = time.perf_counter()
                            calls[variant][target](x)
                            times[(variant, target)].append(time.perf_counter() - t0)
        for target in targets:
            for variant in variants:
                err = failed.get(variant) or errors.get((variant, target))
                if err is not None:
                    result.rows.append(OptionRow(target, variant, batch, None, None, None, 0, err))
                    continue
                ms = 1000 * statistics.median(times[(variant, target)])
                medians[(target, variant, batch)] = ms
                base = medians.get((target, "eager", batch))
                row = OptionRow(target, variant, batch, ms, None if base is None else ms / base,
                                diffs.get((variant, target)), len(times[(variant, target)]))
                result.rows.append(row)
                echo(f"{target:<6} batch {batch:>3} {variant:<15} {ms:9.2f} ms"
                     + ("" if row.vs_eager is None else f"  {row.vs_eager:5.2f}x eager")
                     + ("" if row.max_abs_diff is None else f"  max diff {row.max_abs_diff:.1e}"))
    rb = ratio_batch if ratio_batch in batch_sizes else max(batch_sizes)
    result.config["ratio_batch"] = rb
    bare = medians.get(("victim", "eager", rb))
    if bare and "guard" in targets:
        result.guard_ratio = {v: medians[("guard", v, rb)] / bare for v in variants if ("guard", v, rb) in medians}
    result.notes.append("eager: the library as it runs today (torch's default threads, torch.no_grad inside). "
                        "compile and onnxruntime replace the victim's network, the MAE's reconstruction and the "
                        "auxiliary classifier; the library's own code (validation, softmax, the score) runs around them.")
    if failed:
        result.notes.append("Variants without timings: " + "; ".join(
            f"{v} ({e.removeprefix('not run: ')})" for v, e in failed.items()) + ".")
    return result


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sameguard.bench.inference_options",
                                description="Time the victim, SAME's scoring and the guard under inference options "
                                            "(threads, inference mode, torch.compile, ONNX Runtime); Markdown table.")
    p.add_argument("--batch-sizes", type=comma_ints, default=[1, 16, 64, 256],
                   help="comma-separated batch sizes (default 1,16,64,256)")
    p.add_argument("--repeat", type=int, default=20, help="timed rounds per batch size, median reported (default 20)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated variants (default {','.join(DEFAULT_VARIANTS)}; threads-N for any N)")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated targets (default {','.join(TARGETS)})")
    p.add_argument("--preset", default="cpu", help="SAME preset whose architecture is timed (default cpu)")
    p.add_argument("--victim", default=None, help="folder of a saved victim instead of an untrained conv3")
    p.add_argument("--detector", default=None, help="folder of a saved SAME detector for it (with --victim)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    p.add_argument("--ratio-batch", type=int, default=256, help="batch of the guard / victim ratio (default 256)")
    p.add_argument("--out", default=None, help="also write the results as JSON to this file")
    p.add_argument("-v", "--verbose", action="count", default=0, help="show the progress log")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.repeat < 1:
        p.error(f"--repeat must be a positive integer, got {args.repeat}")
    if (args.victim is None) != (args.detector is None):
        p.error("--victim and --detector go together")
    if args.victim is not None:
        from ..service.loading import load_detector
        from ..victim import Victim

        victim = Victim.load(args.victim)
        detector = load_detector(args.detector, victim)
    else:
        victim, detector = build_models(preset=args.preset)
    try:
        result = measure_inference_options(victim, detector, batch_sizes=args.batch_sizes, repeat=args.repeat,
                                           variants=_names(args.variants), targets=_names(args.targets),
                                           ratio_batch=args.ratio_batch, compile_backend=args.compile_backend)
    except ValueError as exc:
        p.error(str(exc))
    print(result.markdown(), end="", flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(result.to_dict(), fh, indent=2)
            fh.write("\n")
        print(f"\nwrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":  # errors in one sentence, as the sameguard commands report them
    from ..cli_errors import run_reporting_errors

    raise SystemExit(run_reporting_errors("bench.inference_options", main))
