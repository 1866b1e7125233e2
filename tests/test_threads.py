"""The thread governor (llamba/threads.py): torch threads follow the cores other processes leave free."""

import torch

from llamba import threads


def test_governor_gives_way_to_a_busy_process_and_takes_the_cores_back(monkeypatch):
    clock = {"busy": 0.0, "wall": 0.0, "own": 0.0}
    monkeypatch.setattr(threads, "machine_busy_seconds", lambda: (clock["busy"], clock["wall"]))
    monkeypatch.setattr(threads, "own_cpu_seconds", lambda: clock["own"])
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "_fixed", None)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        gov = threads.ThreadGovernor(every_s=5.0)

        # seconds of wall time, of our CPU time, of the other processes' CPU time
        def advance(wall, own, others):
            clock["wall"] += wall
            clock["own"] += own
            clock["busy"] += own + others

        advance(2, 4, 0)
        assert gov.update() == 2  # too soon to decide
        advance(4, 8, 0)
        assert gov.update() == 2  # idle machine: both cores
        advance(6, 6, 6)  # another process keeps one core busy
        assert gov.update() == 1 and torch.get_num_threads() == 1
        advance(6, 6, 0.3)  # it finished
        assert gov.update() == 2 and torch.get_num_threads() == 2
        assert gov.changes == [(1.0, 1), (0.05, 2)]
        advance(6, 0, 12)  # two busy processes: still at least one thread
        assert gov.update() == 1
    finally:
        torch.set_num_threads(before)


def test_fixed_threads_turn_the_governor_off(monkeypatch):
    before = torch.get_num_threads()
    try:
        threads.configure(1)
        assert torch.get_num_threads() == 1 and not threads.ThreadGovernor().enabled
    finally:
        threads.configure(None)
        torch.set_num_threads(before)
