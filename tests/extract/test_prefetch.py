"""The process-wide decoding pool: work queued ahead is found by key, taken once, and dropped when nobody takes it."""

import threading

from extract.inputs.prefetch import Prefetcher


def test_work_queued_ahead_is_taken_once_then_computed_again():
    pool = Prefetcher()
    pool.use_threads(2)
    runs = []
    pool.ahead("a", lambda x: runs.append(x) or x * 2, 21)
    pool.ahead("a", lambda x: runs.append(x) or x * 2, 21)  # already queued: not twice
    assert pool.queued == 1
    assert pool.take("a", lambda x: -1, 0).result() == 42 and pool.queued == 0
    assert pool.take("a", lambda x: x + 1, 1).result() == 2, "taken work is not found twice"
    assert runs == [21]


def test_work_nobody_took_is_dropped_and_not_started_if_it_can_be_avoided():
    pool = Prefetcher()
    pool.use_threads(1)
    gate = threading.Event()
    started = []
    blocker = pool.take("busy", gate.wait, 5)
    pool.ahead("late", started.append, "late")
    assert pool.drop_queued() == 1 and pool.queued == 0
    gate.set()
    assert blocker.result() is True
    pool.use_threads(2)  # a new count rebuilds the pool; earlier work finished on the old one
    pool.take("x", lambda: None).result()
    assert started == [], "queued work behind a busy thread was cancelled"
