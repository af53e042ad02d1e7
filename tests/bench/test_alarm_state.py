"""The per-client alarm state benchmark (``python -m sameguard.bench.alarm_state``)."""

from __future__ import annotations

import pytest

from sameguard.bench import alarm_state


def test_state_size_follows_the_pooling_and_the_history():
    every = alarm_state.measure(None, history=100, queries=3)
    pooled = alarm_state.measure(14, history=100, queries=3)
    longer = alarm_state.measure(14, history=300, queries=3)
    # the bag holds 103 (303) float32 rows of 784 (196) features, plus their float64 distances
    assert every["state_mb"] == pytest.approx(103 * (784 * 4 + 8) / 1e6, rel=0.05)
    assert pooled["state_mb"] == pytest.approx(103 * (196 * 4 + 8) / 1e6, rel=0.1)
    assert longer["state_mb"] > 2.5 * pooled["state_mb"]
    assert every["ms"] > 0 and pooled["ms"] > 0


def test_redis_store_is_timed_and_cleaned_up(redis_server):
    import redis

    client = redis.Redis.from_url(redis_server.url)
    before = set(client.scan_iter(match="sameguard-bench*"))
    for layout in alarm_state.LAYOUTS:  # rows appended (the service's) and the whole state in one value
        r = alarm_state.measure(7, history=50, queries=3, redis_client=client, layout=layout)
        assert r["state_mb"] == pytest.approx(53 * (49 * 4 + 8) / 1e6, rel=0.2) and r["ms"] > 0
        assert set(client.scan_iter(match="sameguard-bench*")) == before  # its keys (heads and rows) are deleted
    with pytest.raises(ValueError, match="layout"):
        alarm_state.measure(7, history=5, queries=1, redis_client=client, layout="chunks")


def test_command_prints_a_table_and_refuses_bad_options(capsys):
    assert alarm_state.main(["--history", "20", "--queries", "2", "--pool-sizes", "none,7"]) == 0
    out = capsys.readouterr().out
    assert "| every pixel | memory |" in out and "| 7x7 pooled | memory |" in out
    for bad in (["--queries", "0"], ["--pool-sizes", "0"], ["--pool-sizes", "big"]):
        with pytest.raises(SystemExit):
            alarm_state.main(bad)
