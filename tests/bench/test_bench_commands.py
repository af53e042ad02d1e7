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
