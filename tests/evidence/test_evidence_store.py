"""State stores and the byte format of per-client state."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from sameguard.evidence import ClientState, InMemoryStore, StateFormatError, StateStore, StreamState
from sameguard.evidence.store import pack, unpack


def test_in_memory_store_basics():
    store: InMemoryStore[int] = InMemoryStore()
    assert isinstance(store, StateStore)
    assert store.get("a") is None
    store.put("a", 1)
    assert store.update("a", lambda old: old + 1) == 2
    assert store.update("b", lambda old: 10 if old is None else old) == 10
    assert sorted(store.keys()) == ["a", "b"]
    assert store.delete("a") is True
    assert store.delete("a") is False
    assert store.keys() == ["b"]


def test_update_is_atomic_under_threads():
    store: InMemoryStore[int] = InMemoryStore()

    def increment(old: int | None) -> int:
        value = 0 if old is None else old
        time.sleep(0)  # invite a thread switch between the read and the write
        return value + 1

    def work() -> None:
        for _ in range(300):
            store.update("client", increment)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.get("client") == 8 * 300


def test_a_failing_update_writes_nothing():
    store: InMemoryStore[int] = InMemoryStore()
    store.put("a", 1)

    def fail(old: int | None) -> int:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        store.update("a", fail)
    assert store.get("a") == 1


def _client_state(with_stream: bool) -> ClientState:
    g = torch.Generator().manual_seed(0)
    stream = StreamState(torch.randn(4, 3, generator=g), torch.rand(4, generator=g), seen=9) if with_stream else None
    return ClientState(
        queries=9, martingales={"same": torch.randn(20, generator=g, dtype=torch.float64),
                                "msp/ood": torch.randn(20, generator=g, dtype=torch.float64)},
        stream_martingale=torch.full((20,), float("-inf"), dtype=torch.float64) if with_stream else None,
        stream=stream, alarm_query=7 if with_stream else None, alarm_time=1.7e9 if with_stream else None)


@pytest.mark.parametrize("with_stream", [True, False])
def test_client_state_bytes_round_trip(with_stream):
    state = _client_state(with_stream)
    data = state.to_bytes()
    assert isinstance(data, bytes)
    restored = ClientState.from_bytes(data)
    assert (restored.queries, restored.alarm_query, restored.alarm_time) == (
        state.queries, state.alarm_query, state.alarm_time)
    assert restored.martingales.keys() == state.martingales.keys()
    for name, value in state.martingales.items():
        torch.testing.assert_close(restored.martingales[name], value, rtol=0, atol=0)
    if with_stream:
        torch.testing.assert_close(restored.stream_martingale, state.stream_martingale, rtol=0, atol=0)
        torch.testing.assert_close(restored.stream.points, state.stream.points, rtol=0, atol=0)
        assert restored.stream.seen == 9
    else:
        assert restored.stream is None and restored.stream_martingale is None


@pytest.mark.parametrize("data", [b"", b"\x00" * 16, "text", StreamState().to_bytes()])
def test_client_state_rejects_other_bytes(data):
    with pytest.raises(StateFormatError):
        ClientState.from_bytes(data)


def test_pack_unpack():
    data = pack({"a": torch.arange(3)}, {"format": "x", "n": 3})
    tensors, header = unpack(data, "x")
    assert header == {"format": "x", "n": 3}
    torch.testing.assert_close(tensors["a"], torch.arange(3))
    with pytest.raises(StateFormatError, match="'y'"):
        unpack(data, "y")
