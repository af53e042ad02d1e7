"""The artifact cache: a second call reuses the cached victim, a tampered one is trained again."""

from __future__ import annotations

from sameguard.cache import cache_key, cached_victim


def test_cache_key_depends_on_every_setting():
    assert cache_key(a=1, b="x") == cache_key(b="x", a=1)
    assert cache_key(a=1) != cache_key(a=2)


def test_cached_victim_reused_then_retrained_when_tampered(tmp_path, fmnist_small):
    train, test = fmnist_small
    train, test = train.take(200, seed=0), test.take(100, seed=0)
    lines: list[str] = []
    kwargs = dict(arch="lenet5", epochs=1, seed=0, device="cpu", progress=False, steps=lines.append)
    first = cached_victim(tmp_path, train, test, **kwargs)
    second = cached_victim(tmp_path, train, test, **kwargs)
    assert second.weights_sha256 == first.weights_sha256
    assert ["trained" in lines[0], "reused from the cache" in lines[1]] == [True, True]
    (folder,) = [p for p in tmp_path.iterdir() if p.name.startswith("victim-")]
    weights = next(p for p in folder.iterdir() if p.suffix == ".safetensors")
    data = weights.read_bytes()
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    cached_victim(tmp_path, train, test, **kwargs)
    assert "trained" in lines[2]
