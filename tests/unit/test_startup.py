"""clipkit.startup.paused_collection: no cyclic collection while the body runs, what it made frozen afterwards,
and the collector's state given back as it was (checked with CPython's gc module itself)."""
import gc

from clipkit.startup import paused_collection


def test_no_collection_inside_then_frozen_and_state_restored():
    collections = []

    def count(phase, info):
        if phase == "start":
            collections.append(info["generation"])

    assert gc.isenabled()
    gc.callbacks.append(count)
    try:
        with paused_collection():
            assert not gc.isenabled()
            made = [[object()] for _ in range(50_000)]  # many container allocations: would trigger collections
            assert collections == []
            frozen_before = gc.get_freeze_count()
        assert gc.isenabled()
        assert gc.get_freeze_count() >= frozen_before + len(made)
    finally:
        gc.callbacks.remove(count)


def test_a_disabled_collector_stays_disabled():
    gc.disable()
    try:
        with paused_collection():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
