"""The inference-options benchmark: structure of its table and JSON, and every variant's outputs equal eager's."""

from __future__ import annotations

import json

import pytest
import torch

from sameguard.bench.inference_options import (
    TARGETS,
    InferenceOptionsResult,
    OptionRow,
    build_models,
    main,
    measure_inference_options,
)


@pytest.fixture(scope="module")
def models():
    return build_models(preset="tiny", victim_arch="lenet5")


@pytest.fixture
def one_thread():
    """One torch thread for the test's 'eager' (a loaded test machine makes multi-threaded calls crawl)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow  # torch.compile traces the MAE: ~10 s quiet, ~30 s on a loaded machine
def test_rows_ratio_and_outputs_equal_eager(models, one_thread):
    victim, detector = models
    lines: list[str] = []
    result = measure_inference_options(victim, detector, batch_sizes=(1, 3), repeat=2, ratio_batch=3,
                                       variants=("threads-1", "inference-mode", "compile", "onnxruntime"),
                                       compile_backend="aot_eager", echo=lines.append)
    variants = ["eager", "threads-1", "inference-mode", "compile", "onnxruntime"]
    assert [(r.target, r.variant, r.batch) for r in result.rows] == [
        (t, v, b) for b in (1, 3) for t in TARGETS for v in variants]
    for r in result.rows:
        if r.variant == "onnxruntime" and r.error is not None:  # onnx / onnxruntime are not dependencies
            assert r.error.startswith("not run") and r.ms is None
            continue
        assert r.error is None, r
        assert r.ms > 0 and r.calls == 2 and r.vs_eager == pytest.approx(r.ms / next(
            e.ms for e in result.rows if (e.target, e.variant, e.batch) == (r.target, "eager", r.batch)))
        assert r.max_abs_diff is not None and r.max_abs_diff < 1e-4, r  # compiled (etc.) outputs equal eager's
    assert set(result.guard_ratio) >= {"eager", "threads-1", "compile"} and result.config["ratio_batch"] == 3
    assert all(v > 0 for v in result.guard_ratio.values())
    text = result.markdown()
    assert "| target | batch | variant | ms per batch | vs eager | max abs diff vs eager |" in text
    assert "Guard latency over the bare victim's at batch 3" in text and "| compile |" in text
    assert len(lines) == sum(r.error is None for r in result.rows)
    back = json.loads(json.dumps(result.to_dict()))
    assert set(back) == {"config", "rows", "guard_ratio", "notes"} and len(back["rows"]) == len(result.rows)
    assert set(back["rows"][0]) == set(OptionRow.__dataclass_fields__)


def test_a_failing_variant_is_a_row_not_a_crash(models, one_thread):
    victim, detector = models
    result = measure_inference_options(victim, detector, batch_sizes=(2,), repeat=1, targets=("victim",),
                                       variants=("compile",), compile_backend="no-such-backend")
    [eager, compiled] = result.rows
    assert eager.error is None and compiled.variant == "compile" and compiled.ms is None
    assert compiled.error.startswith("error:") and compiled.error in result.markdown()
    assert isinstance(result, InferenceOptionsResult) and result.guard_ratio == {}  # no guard timed


def test_bad_arguments(models):
    victim, detector = models
    with pytest.raises(ValueError, match="Unknown variant"):
        measure_inference_options(victim, detector, variants=("turbo",))
    with pytest.raises(ValueError, match="Unknown targets"):
        measure_inference_options(victim, detector, targets=("mae",))
    with pytest.raises(ValueError, match="positive"):
        measure_inference_options(victim, detector, repeat=0)
    with pytest.raises(SystemExit):
        main(["--repeat", "0"])
    with pytest.raises(SystemExit):
        main(["--victim", "somewhere"])


def test_main_prints_the_table_and_writes_json(tmp_path, capsys, one_thread):
    out = tmp_path / "options.json"
    assert main(["--batch-sizes", "2", "--repeat", "1", "--variants", "eager,threads-1", "--targets", "victim,guard",
                 "--preset", "tiny", "--ratio-batch", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| victim | 2 | threads-1 |" in text and "| guard | 2 | eager |" in text
    data = json.loads(out.read_text())
    assert [(r["target"], r["variant"]) for r in data["rows"]] == [
        ("victim", "eager"), ("victim", "threads-1"), ("guard", "eager"), ("guard", "threads-1")]
    assert set(data["guard_ratio"]) == {"eager", "threads-1"}


def test_eager_is_measured_first_whatever_the_order_given(models, one_thread):
    victim, detector = models
    result = measure_inference_options(victim, detector, batch_sizes=(2,), repeat=1, targets=("victim",),
                                       variants=("threads-1", "eager"))
    assert [r.variant for r in result.rows] == ["eager", "threads-1"]
    threads = result.rows[1]
    assert threads.vs_eager is not None and threads.max_abs_diff is not None  # compared with eager's, not skipped
