"""The thread governor: torch's thread count follows the cores other processes leave free."""

from __future__ import annotations

import torch

from lowbit import threads


def test_threads_are_the_cores_left_within_bounds():
    assert threads.threads_for(0.0, cores=2, most=2) == 2
    assert threads.threads_for(0.3, cores=2, most=2) == 2
    assert threads.threads_for(1.0, cores=2, most=2) == 1
    assert threads.threads_for(3.0, cores=2, most=2) == 1  # never below one
    assert threads.threads_for(0.0, cores=8, most=4) == 4  # never above the count it started with
    assert threads.threads_for(2.2, cores=8, most=8) == 6


def test_the_governor_drops_a_thread_while_another_process_is_busy_and_takes_it_back(monkeypatch):
    """Fake clocks: the machine's busy seconds grow by one core more than this process's own CPU time while the
    other process runs, then by exactly this process's own."""
    clock = {"wall": 100.0, "busy": 1000.0, "own": 10.0}
    monkeypatch.setattr(threads, "busy_seconds", lambda: clock["busy"])
    monkeypatch.setattr(threads.time, "monotonic", lambda: clock["wall"])
    monkeypatch.setattr(threads.time, "process_time", lambda: clock["own"])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        governor = threads.ThreadGovernor(interval=0.25, most=2)
        governor.cores = 2

        def advance(seconds: float, others: float, own: float = 2.0):
            clock["wall"] += seconds
            clock["own"] += own * seconds
            clock["busy"] += (own + others) * seconds
            governor(None, ())

        governor(None, ())  # first look: nothing to compare with yet
        advance(0.5, others=1.0)
        assert torch.get_num_threads() == 1
        advance(0.1, others=0.0)  # within the interval: no new look
        assert torch.get_num_threads() == 1
        advance(0.5, others=0.05, own=1.0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_loaded_checkpoints_get_one_governor_unless_turned_off(monkeypatch, ckpt):
    import lowbit

    model, _ = lowbit.load(ckpt)
    hooks = [h for h in model._forward_pre_hooks.values() if isinstance(h, threads.ThreadGovernor)]
    assert len(hooks) == (1 if threads.busy_seconds() is not None else 0)
    assert threads.adapt_threads(model) is (hooks[0] if hooks else None)  # installed once
    monkeypatch.setenv(threads.ENV, "0")
    model, _ = lowbit.load(ckpt)
    assert not any(isinstance(h, threads.ThreadGovernor) for h in model._forward_pre_hooks.values())
