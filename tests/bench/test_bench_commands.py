"""The ``bench-service`` command's wiring (it lives in ``sameguard.bench``, which imports the service, not the reverse)."""

from __future__ import annotations

import argparse

from sameguard.bench.commands import BENCH_COMMANDS, add_bench_commands
from sameguard.cli import build_parser


def test_bench_commands_parse():
    parser = argparse.ArgumentParser(prog="sameguard")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = add_bench_commands(sub)
    assert set(commands) == set(BENCH_COMMANDS) == {"bench-service"}
    args = parser.parse_args(["bench-service", "--requests", "10", "--attacks", "", "--batch-sizes", "1,8"])
    assert (args.requests, args.attacks, args.batch_sizes, args.workdir) == (10, "", [1, 8], "runs/service-bench")


def test_cli_has_bench_service():
    args = build_parser().parse_args(["bench-service", "--budget", "50"])
    assert (args.command, args.budget) == ("bench-service", 50)


def test_bench_service_workers_option():
    import pytest

    from sameguard.bench.commands import worker_counts

    parser = build_parser()
    args = parser.parse_args(["bench-service", "--workers", "1,2", "--workers-state", "redis://127.0.0.1:6379/3"])
    assert (args.workers, args.workers_state, args.workers_db, args.workers_threads) == (
        [1, 2], "redis://127.0.0.1:6379/3", None, None)
    assert parser.parse_args(["bench-service"]).workers == []  # no worker rows unless asked
    assert worker_counts("") == [] and worker_counts(" 2 ") == [2]
    for bad, message in (("0", "positive"), ("1,x", "comma-separated"), ("65", "between 1 and 64"), ("2,2", "once")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            worker_counts(bad)
    # Comma-separated distinct values of the server's choices, one row each.
    for option, default, given, bad_values in (
            ("workers_sockets", ("balanced",), ("shared", "reuse-port"), ("", "round-robin", "shared,shared")),
            ("workers_policies", ("monitor",), ("off", "monitor"), ("", "block", "off,off"))):
        flag = "--" + option.replace("_", "-")
        assert getattr(parser.parse_args(["bench-service"]), option) == default
        assert getattr(parser.parse_args(["bench-service", flag, ",".join(given)]), option) == given
        for bad in bad_values:
            with pytest.raises(SystemExit):
                parser.parse_args(["bench-service", flag, bad])


def test_bench_service_workers_errors(tmp_path):
    import pytest

    from sameguard.bench.commands import bench_service_main

    parser = build_parser()
    with pytest.raises(ValueError, match="--workers-threads"):
        bench_service_main(parser.parse_args(["bench-service", "--workers", "2", "--workers-threads", "0"]))
    with pytest.raises(ValueError, match="redis://"):
        bench_service_main(parser.parse_args(["bench-service", "--workers", "2", "--workers-state", "memory://"]))
    with pytest.raises(ValueError, match="redis://"):  # the Ray rows share their state in Redis too
        bench_service_main(parser.parse_args(["bench-service", "--ray-replicas", "1", "--workers-state", "memory://"]))
    args = parser.parse_args(["bench-service", "--ray-replicas", "1,2"])
    assert (args.ray_replicas, parser.parse_args(["bench-service"]).ray_replicas) == ([1, 2], [])
