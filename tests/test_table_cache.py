"""The launch-table caches of the tabled backends (C++: csrc/multi_tensor_cuda.cuh, run by the
"cuda-emulated" backend; Triton: kernels/_multi_tensor.py) under CUDA-graph capture and streams.

A captured launch keeps its table's address: a table used during a capture is held and never
evicted, a table missing during a capture is refused, and a table used on a stream other than its
own is recorded there (record_stream) once. On the CPU the capture state and the current stream
are stubs the tests set; the GPU check (test_capturable.py) replays a graph after cycling the cache.
"""

import pytest
import torch
from conftest import AVAILABLE_BACKENDS

#: more distinct lists of tensors than either cache keeps (256)
CYCLE = 300


def lists(*sizes: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(params, weights) of restore: a table key, as long as these tensors live."""
    return [torch.full((n,), float("nan")) for n in sizes], [torch.ones(n) for n in sizes]


def distinct_lists(count: int) -> list[tuple]:
    """``count`` pairs of one-tensor lists: each pair a new table key."""
    return [lists(3) for _ in range(count)]


# ---- C++: the cuda tier's cache, on the emulated execution layer -------------------------------
needs_emulated = pytest.mark.skipif(
    "cuda-emulated" not in AVAILABLE_BACKENDS, reason="the cuda-emulated backend is not available here"
)


@pytest.fixture
def emulated():
    """The emulated backend with a fresh cache, not capturing, on stream 0 (and left so)."""
    from sambayes import backends

    module = backends.resolve("cuda-emulated", "cpu")
    module.ops.clear_tables()
    module.ops.counters(True)
    yield module
    module.ops.set_capturing(False)
    module.ops.set_stream(0)
    module.ops.clear_tables()


def restore(module, pair: tuple) -> None:
    """One launch with the pair's table: θ = weights (ones)."""
    module.restore(*pair)


def tables(module) -> tuple[int, int]:
    """(tables cached, tables held for graphs)."""
    _, _, cached, held = module.ops.counters(False)
    return cached, held


@needs_emulated
def test_a_table_missing_during_a_capture_is_refused(emulated):
    pair = lists(5)
    emulated.ops.set_capturing(True)
    with pytest.raises(RuntimeError, match="cannot build one during the capture of a CUDA graph.*warm-up"):
        restore(emulated, pair)
    assert tables(emulated) == (0, 0) and pair[0][0].isnan().all()  # nothing built, nothing launched
    emulated.ops.set_capturing(False)
    restore(emulated, pair)  # the warm-up
    pair[0][0].fill_(float("nan"))
    emulated.ops.set_capturing(True)
    restore(emulated, pair)  # captured: the table exists
    assert torch.equal(pair[0][0], torch.ones(5))


@needs_emulated
def test_a_table_used_during_a_capture_is_held_and_never_evicted(emulated):
    captured, other = lists(5), lists(6)
    restore(emulated, captured)
    restore(emulated, other)
    emulated.ops.set_capturing(True)
    restore(emulated, captured)
    emulated.ops.set_capturing(False)
    assert tables(emulated) == (2, 1)
    for params in distinct_lists(CYCLE):  # cycles the LRU: every table no graph holds is evicted
        restore(emulated, params)
    assert tables(emulated) == (256 + 1, 1)
    emulated.ops.set_capturing(True)
    restore(emulated, captured)  # still there: a miss would be refused
    with pytest.raises(RuntimeError, match="during the capture"):
        restore(emulated, other)  # evicted: the cache did cycle


@needs_emulated
def test_a_table_used_on_another_stream_is_recorded_there_once(emulated):
    pair = lists(5)
    restore(emulated, pair)  # built on stream 0
    for stream, recorded in ((0, 0), (7, 1), (7, 1), (9, 2), (0, 2), (9, 2)):
        emulated.ops.set_stream(stream)
        restore(emulated, pair)
        assert emulated.ops.counters(False)[1] == recorded, (stream, recorded)
    assert tables(emulated) == (1, 0)


# ---- Triton: kernels/_multi_tensor.py, under the interpreter -------------------------------------
needs_triton = pytest.mark.skipif("triton" not in AVAILABLE_BACKENDS, reason="the triton backend is not available here")


@pytest.fixture
def triton_cache(monkeypatch):
    """kernels/_multi_tensor.py with an empty cache and stubbed capture state and stream."""
    from sambayes.kernels import _multi_tensor

    state = {"capturing": False, "stream": "main", "recorded": []}
    monkeypatch.setattr(_multi_tensor, "_cache", type(_multi_tensor._cache)())
    monkeypatch.setattr(_multi_tensor, "_held", {})
    monkeypatch.setattr(_multi_tensor, "_capturing", lambda device: state["capturing"])
    monkeypatch.setattr(_multi_tensor, "_current_stream", lambda device: state["stream"])
    monkeypatch.setattr(
        _multi_tensor, "_record_stream", lambda table, stream: state["recorded"].append((table.data_ptr(), stream))
    )
    return _multi_tensor, state


def table_of(cache, pair: tuple):
    return cache.tensor_table(list(pair), "PS")


@needs_triton
def test_triton_a_table_missing_during_a_capture_is_refused(triton_cache):
    cache, state = triton_cache
    state["capturing"] = True
    with pytest.raises(RuntimeError, match="cannot build one during the capture of a CUDA graph.*warm-up"):
        table_of(cache, lists(5))
    assert cache.cached_tables() == 0


@needs_triton
def test_triton_a_table_used_during_a_capture_is_held_and_never_evicted(triton_cache):
    cache, state = triton_cache
    captured, other = lists(5), lists(6)
    table = table_of(cache, captured)
    table_of(cache, other)
    state["capturing"] = True
    assert table_of(cache, captured) is table
    state["capturing"] = False
    for params in distinct_lists(CYCLE):
        table_of(cache, params)
    assert cache.cached_tables() == cache._CACHE_SIZE + 1 and len(cache._held) == 1
    state["capturing"] = True
    assert table_of(cache, captured) is table  # held through the cycling
    with pytest.raises(RuntimeError, match="during the capture"):
        table_of(cache, other)  # evicted


@needs_triton
def test_triton_a_table_used_on_another_stream_is_recorded_there_once(triton_cache):
    cache, state = triton_cache
    pair = lists(5, 3)
    table = table_of(cache, pair)  # built on "main"
    for stream in ("main", "side", "side", "other", "main"):
        state["stream"] = stream
        assert table_of(cache, pair) is table
    parts = [part.table.data_ptr() for part in table.parts]
    assert parts and state["recorded"] == [(part, stream) for stream in ("side", "other") for part in parts]
