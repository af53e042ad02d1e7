"""Every error of the command line is one sentence on standard error and exit status 2 (traceback only with -v).

Each test runs ``sameguard.cli.main`` in process on a path that used to end in a raw traceback, and
checks the status, that the message says what was expected, and that it is one line.
"""

from __future__ import annotations

import io
import socket
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from _cli import run
from sameguard.cli import build_parser, main
from sameguard.detectors import MSPDetector
from sameguard.models import build_classifier
from sameguard.victim import Victim


def one_error(capsys, code: int, *expected: str, status: int = 2) -> str:
    """Assert ``code == status`` and one line on stderr that holds every ``expected`` text; return it."""
    err = capsys.readouterr().err.strip()
    assert code == status, err
    assert "Traceback" not in err
    assert err.count("\n") == 0, err
    assert err.startswith("sameguard"), err
    for text in expected:
        assert text in err, err
    return err


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """An untrained LeNet-5 victim and an MSP detector for it, saved: (victim folder, detector folder)."""
    root = tmp_path_factory.mktemp("pair")
    torch.manual_seed(0)
    victim = Victim(build_classifier("lenet5", 1, 28, 10), arch="lenet5", dataset="fashion-mnist",
                    image_shape=(1, 28, 28), classes=[str(i) for i in range(10)])
    victim.save(root / "victim")
    detector = MSPDetector().fit(victim)
    detector.calibrate(torch.rand(50, 1, 28, 28) * 2 - 1, 0.1)
    detector.save(root / "det")
    return root / "victim", root / "det"


# ------------------------------------------------------------------ image files
def test_png_that_is_not_a_png(pair, tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_text("not an image")
    code, _ = run("score", "--victim", str(pair[0]), "--detector", str(pair[1]), "--images", str(tmp_path / "imgs"))
    one_error(capsys, code, "a.png is not a PNG image")


def test_text_file_named_npy_is_not_called_pickled(pair, tmp_path, capsys):
    (tmp_path / "garbage.npy").write_text("hello\n")
    code, _ = run("score", "--victim", str(pair[0]), "--detector", str(pair[1]), "--images",
                  str(tmp_path / "garbage.npy"))
    err = one_error(capsys, code, "is not a numpy .npy file")
    assert "pickle" not in err.lower() and "allow_pickle" not in err


def test_object_npy_is_refused_without_suggesting_unsafe_loading(pair, tmp_path, capsys):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    code, _ = run("score", "--victim", str(pair[0]), "--detector", str(pair[1]), "--images", str(tmp_path / "obj.npy"))
    err = one_error(capsys, code, "never unpickles")
    assert "allow_pickle" not in err


# ------------------------------------------------------------------ devices
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["train-victim", "score"])
def test_cuda_on_a_cpu_build(pair, tmp_path, capsys, command):
    argv = (["train-victim", "--out", str(tmp_path / "v")] if command == "train-victim" else
            ["score", "--victim", str(pair[0]), "--detector", str(pair[1]), "--images", str(tmp_path)])
    code, _ = run(*argv, "--device", "cuda")
    one_error(capsys, code, "--device cuda", "--device cpu")


def test_unknown_device(tmp_path, capsys):
    code, _ = run("train-victim", "--out", str(tmp_path / "v"), "--device", "tpu")
    one_error(capsys, code, "'tpu' is not a torch device")
    assert not (tmp_path / "v").exists()


# ------------------------------------------------------------------ output paths, checked before any work
def test_out_is_an_existing_file(tmp_path, capsys):
    (tmp_path / "README.md").write_text("x")
    code, _ = run("train-victim", "--out", str(tmp_path / "README.md"), "--epochs", "1")
    one_error(capsys, code, "is an existing file, not a folder")


@pytest.mark.parametrize("argv, flag", [
    (["score", "--out", "{missing}/s.csv"], "--out"),
    (["attack", "jbda", "--scores-out", "{missing}/q.csv", "--detector", "{det}"], "--scores-out"),
    (["bench-attacks", "--json", "{missing}/rows.json"], "--json"),
])
def test_output_in_a_missing_folder_fails_before_the_work(pair, tmp_path, capsys, argv, flag):
    values = {"missing": str(tmp_path / "no" / "such"), "det": str(pair[1])}
    argv = [a.format(**values) for a in argv]
    extra = ["--images", str(tmp_path), "--detector", str(pair[1])] if argv[0] == "score" else []
    code, out = run(*argv, "--victim", str(pair[0]), *extra, "--no-progress")
    one_error(capsys, code, flag, "does not exist", "nothing was run")
    assert out == ""


def test_data_dir_that_does_not_exist(tmp_path, capsys):
    code, _ = run("train-victim", "--out", str(tmp_path / "v"), "--data-dir", str(tmp_path / "nonexistent"))
    one_error(capsys, code, "--data-dir", "is not an existing folder")


def test_comma_separated_budgets(pair, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench-attacks", "--victim", str(pair[0]), "--budgets", "200,abc"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'abc'" in err and "--budgets" in err and "Traceback" not in err


# ------------------------------------------------------------------ databases
@pytest.mark.parametrize("argv", [["audit"], ["keys", "create", "--name", "alice"], ["keys", "list"]])
def test_database_in_a_missing_folder(tmp_path, capsys, argv):
    code, _ = run(*argv, "--db", f"sqlite:///{tmp_path}/nonexistent-dir/x.db")
    one_error(capsys, code, "nonexistent-dir")


def test_audit_never_creates_a_database(tmp_path, capsys):
    code, _ = run("audit", "--db", f"sqlite:///{tmp_path}/typo.db")
    one_error(capsys, code, "There is no database at", "does not create one")
    assert not (tmp_path / "typo.db").exists()


def test_audit_of_a_database_without_an_audit_log(tmp_path, capsys):
    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE t (x INTEGER)").connection.commit()
    code, _ = run("audit", "--db", f"sqlite:///{tmp_path}/other.db")
    one_error(capsys, code, "holds no sameguard audit log")
    tables = {r[0] for r in sqlite3.connect(tmp_path / "other.db").execute("SELECT name FROM sqlite_master")}
    assert tables == {"t"}


def test_database_error_from_the_driver_is_one_sentence(tmp_path, capsys):
    (tmp_path / "notadb.db").write_text("this is not a SQLite file " * 100)
    code, _ = run("keys", "list", "--db", f"sqlite:///{tmp_path}/notadb.db")
    one_error(capsys, code, "could not be used", "check --db")


def test_serve_on_a_port_in_use(pair, tmp_path, capsys):
    pytest.importorskip("fastapi")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code, _ = run("serve", "--victim", str(pair[0]), "--policy", "off", "--port", str(port),
                      "--db", f"sqlite:///{tmp_path}/s.db")
    one_error(capsys, code, f"Port {port} on 127.0.0.1 is already in use", "--port")


# ------------------------------------------------------------------ other messages
def test_wrong_victim_names_no_python_only_option(pair, tmp_path, capsys):
    torch.manual_seed(1)
    other = Victim(build_classifier("lenet5", 1, 28, 10), arch="lenet5", dataset="fashion-mnist",
                   image_shape=(1, 28, 28), classes=[str(i) for i in range(10)])
    other.save(tmp_path / "other")
    np.save(tmp_path / "x.npy", np.zeros((2, 28, 28), dtype=np.uint8))
    code, _ = run("score", "--victim", str(tmp_path / "other"), "--detector", str(pair[1]), "--images",
                  str(tmp_path / "x.npy"))
    err = one_error(capsys, code, "refit the detector for this victim")
    assert "check_victim" not in err


def test_broken_pipe_is_one_line(pair, monkeypatch, capsys):
    class ClosedPipe(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    code = main(["info", str(pair[0])])
    one_error(capsys, code, "standard output was closed")


def test_broken_pipe_of_a_real_pipe(pair):
    """``sameguard info DIR | head -c 0``: the reader is gone before the command writes."""
    script = textwrap.dedent(f"""
        import sys, time
        from sameguard.cli import main
        time.sleep(0.5)
        sys.exit(main(["info", {str(pair[0])!r}]))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader leaves before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 2, err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert err.strip().count("\n") == 0 and "standard output was closed" in err


def test_unexpected_error_is_one_line_with_status_1_and_a_traceback_with_v(monkeypatch, capsys):
    from sameguard import cli

    def boom(args):
        raise RuntimeError("kaboom")

    monkeypatch.setitem(cli.COMMANDS, "bench", boom)
    code = main(["bench"])
    one_error(capsys, code, "unexpected RuntimeError: kaboom", "bug", "-v", status=1)
    code = main(["bench", "-v"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" in err and "kaboom" in err


def test_verbose_shows_the_traceback_of_a_user_error(tmp_path, capsys):
    code, _ = run("audit", "--db", f"sqlite:///{tmp_path}/typo.db", "-v")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" in err and "There is no database" in err


# ------------------------------------------------------------------ help texts
def _all_parsers(parser, prefix=()):
    import argparse

    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, prefix + (name,))


def test_every_option_has_a_help_text_and_no_doubled_percent():
    missing, doubled = [], []
    for names, parser in _all_parsers(build_parser()):
        for action in parser._actions:
            if action.option_strings and not action.help:
                missing.append(f"{' '.join(names)} {action.option_strings[0]}")
        text = parser.format_help()
        if "%%" in text:
            doubled.append(" ".join(names))
    assert not missing, f"options without help: {missing}"
    assert not doubled, f"'%%' printed in the help of: {doubled}"


def test_ctrl_c_is_one_line_and_status_130(monkeypatch, capsys):
    from sameguard import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "bench", interrupted)
    code = main(["bench"])
    err = capsys.readouterr().err.strip()
    assert code == 130 and err == "sameguard bench: interrupted."


@pytest.mark.parametrize("value", ["1,abc", "0,64"])
def test_bench_service_batch_sizes_in_one_sentence(capsys, value):
    with pytest.raises(SystemExit) as exc:  # the same argparse type as --budgets (cli_checks.comma_ints)
        main(["bench-service", "--batch-sizes", value, "--victim", "/nonexistent"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--batch-sizes" in err and "positive integers" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["bench", "same-study"])
@pytest.mark.parametrize("value", ["x", "0,-1", ","])
def test_bench_seeds_in_one_sentence(capsys, tmp_path, command, value):
    code = main([command, "--config", "quick", "--seeds", value] + (
        ["--detection-only"] if command == "bench" else ["--out", str(tmp_path / "study.md")]))
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith(f"sameguard {command}: error: --seeds:")


def test_same_study_seeds_reach_the_study(monkeypatch, tmp_path):
    import sameguard.bench.same_study as same_study
    import sameguard.bench.same_study_report as report

    seen = {}

    def fake_study(config, bench_dir, workdir, **kwargs):
        seen.update(seeds=config.seeds, candidates=[c.name for c in kwargs["candidates"]])

    def fake_report(study_json, out, *, command, notes=None):
        seen["command"] = command
        out.write_text("report")
        return out

    monkeypatch.setattr(same_study, "run_study", fake_study)
    monkeypatch.setattr(report, "write_study_report", fake_report)
    out = tmp_path / "study.md"
    assert main(["same-study", "--config", "quick", "--candidates", "0,1", "--seeds", "1,2", "--out", str(out),
                 "--workdir", str(tmp_path / "work")]) == 0
    assert seen == {"seeds": (1, 2), "candidates": [c.name for c in same_study.CANDIDATES[:2]],
                    "command": f"sameguard same-study --config quick --candidates 0,1 --seeds 1,2 --out {out}"}


def test_bench_seeds_and_detection_only_reach_the_runner(monkeypatch, tmp_path):
    import sameguard.bench.preflight as preflight
    import sameguard.bench.runner as runner

    seen = {}

    def fake_run(config, out, **kwargs):
        seen.update(seeds=config.seeds, detection_only=kwargs["detection_only"])
        (out / "report.md").write_text("report")

    monkeypatch.setattr(runner, "run_benchmark", fake_run)
    monkeypatch.setattr(preflight, "check_data", lambda *a, **k: None)
    out = tmp_path / "bench"
    out.mkdir()
    assert main(["bench", "--config", "standard", "--seeds", "0,1", "--detection-only", "--out", str(out)]) == 0
    assert seen == {"seeds": (0, 1), "detection_only": True}
