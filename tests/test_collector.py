"""core.threads: the cyclic collector is off inside ``single_threaded`` (the opt-in block), as it was after and
untouched by a library call that did not opt in; what reading and analysing a composition (sum and sequential)
leaves behind is freed by reference counting alone — no reference cycle that only the paused collector could
reclaim."""

from __future__ import annotations

import gc
import json
import threading

import pytest
import torch

import rankscope
from rankscope.core.threads import single_threaded as collector_paused

from .factories import lora_config, write_lora

MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj")


@pytest.fixture
def collector_on():
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_paused_inside_restored_after_nested_and_threaded(collector_on):
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the inner block's end does not switch it back on
        seen = []
        worker = threading.Thread(target=lambda: seen.append(_inside_another_thread()))
        worker.start()
        worker.join()
        assert seen == [False] and not gc.isenabled()  # another thread's block ends, ours still holds
    assert gc.isenabled()


def _inside_another_thread() -> bool:
    with collector_paused():
        return gc.isenabled()


def test_a_library_call_without_threads_leaves_the_collector_alone(collector_on, tmp_path, monkeypatch):
    import importlib

    analyze_module = importlib.import_module("rankscope.analysis.analyze")

    checkpoint = rankscope.load(_composition(tmp_path, "sum"))
    seen = []
    real = analyze_module.composition_fields

    def watched(*args, **kwargs):  # called inside analyze's block, once per composite layer
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(analyze_module, "composition_fields", watched)
    rankscope.analyze(checkpoint)  # threads=None: nothing process-wide changes
    assert seen and all(seen)
    seen.clear()
    rankscope.analyze(checkpoint, threads=1)  # the caller opted in
    assert seen and not any(seen) and gc.isenabled()


def test_left_as_found_when_the_caller_had_it_off(collector_on):
    gc.disable()
    with collector_paused():
        pass
    assert not gc.isenabled()
    with pytest.raises(ValueError), collector_paused():
        raise ValueError("an error inside the block")
    assert not gc.isenabled()
    gc.enable()
    with pytest.raises(ValueError), collector_paused():
        raise ValueError("an error inside the block")
    assert gc.isenabled()


def _composition(root, mode: str):
    for index in range(3):
        g = torch.Generator().manual_seed(index)
        factors = {
            m: (torch.randn(2 + index, 16, generator=g), torch.randn(12, 2 + index, generator=g)) for m in MODULES
        }
        write_lora(root / f"r{index}", factors, lora_config(r=2 + index, lora_alpha=4.0))
    manifest = {"format": "rankscope.composition/1", "mode": mode, "components": ["r0", "r1", "r2"],
                "weights": [0.5, 0.3, 0.2]}  # fmt: skip
    (root / "composition.json").write_text(json.dumps(manifest))
    return root


def _ours(objects) -> list[str]:
    """rankscope's objects and tensors among ``objects`` (the third-party ones, e.g. threadpoolctl's, aside)."""
    names = []
    for thing in objects:
        kind = type(thing)
        if kind.__module__.startswith("rankscope") or isinstance(thing, torch.Tensor):
            names.append(f"{kind.__module__}.{kind.__qualname__}")
    return names


@pytest.mark.parametrize("mode", ["sum", "sequential"])
def test_reading_and_analysing_leaves_no_reference_cycles(tmp_path, collector_on, mode):
    path = _composition(tmp_path, mode)
    rankscope.analyze(rankscope.load(path))  # imports, caches and registries out of the way
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection finds stays in gc.garbage, for the assertion to see
    try:
        checkpoint = rankscope.load(path)
        analysis = rankscope.analyze(checkpoint)
        assert len(analysis) == len(MODULES) and all(r.alignment for r in analysis)
        del checkpoint, analysis
        gc.collect()
        leaked = _ours(gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert leaked == []
