"""The CPU thread chooser (bpo_fast.runtime): /proc/stat parsing and the choice from injected
samples (no timing)."""

import pytest
import torch

from bpo_fast import runtime
from bpo_fast.runtime import CpuSampler, ThreadGovernor, choose_threads, threads_for

STAT = """cpu  300 0 100 600 0 0 0 0 0 0
cpu0 100 0 50 350 0 0 0 0 0 0
cpu1 200 0 50 250 0 0 0 0 0 0
intr 1 2 3
ctxt 42
"""


def test_read_proc_stat(tmp_path):
    p = tmp_path / "stat"
    p.write_text(STAT)
    assert runtime._read_proc_stat(str(p)) == {0: (150, 500), 1: (250, 500)}


class FakeStat:
    """Per-CPU (busy, total) jiffies advanced by scripted busy fractions per window."""

    def __init__(self, ncpu, own_per_window=0.0):
        self.t = {c: [0, 0] for c in range(ncpu)}
        self.own = 0.0

    def advance(self, busy, jiffies=100, own_s=0.0):
        for c, b in enumerate(busy):
            self.t[c][0] += round(b * jiffies)
            self.t[c][1] += jiffies
        self.own += own_s

    def read(self):
        return {c: tuple(v) for c, v in self.t.items()}


def sampler_for(fake, cpus):
    return CpuSampler(read_stat=fake.read, own_cpu=lambda: fake.own, cpus=cpus, clk_tck=100)


@pytest.mark.parametrize("busy,expected", [
    ((0.0, 0.0), 2),        # idle: both cores
    ((1.0, 0.0), 1),        # one busy-looping process: one thread, not two on one free core
    ((1.0, 1.0), 1),        # fully loaded: still one
    ((0.3, 0.3), 1),        # 1.4 free: a second core shared 60/40 would stall the barriers
    ((0.1, 0.05), 2),       # background noise does not cost a thread
])
def test_choose_threads_from_samples(busy, expected):
    fake = FakeStat(2)
    s = sampler_for(fake, [0, 1])
    n, why = choose_threads(None, sampler=s, sleep=lambda _: fake.advance(busy), quota=0)
    assert n == expected
    assert "of 2 allowed CPUs free" in why


def test_only_the_affinity_mask_counts_and_quota_caps():
    fake = FakeStat(4)
    # CPUs 2, 3 busy, but the mask allows 0, 1 only: both free
    s = sampler_for(fake, [0, 1])
    n, _ = choose_threads(None, sampler=s, sleep=lambda _: fake.advance((0, 0, 1, 1)), quota=0)
    assert n == 2
    s = sampler_for(fake, [0, 1, 2, 3])
    n, _ = choose_threads(None, sampler=s, sleep=lambda _: fake.advance((0, 0, 0, 0)), quota=3)
    assert n == 3


def test_own_cpu_time_is_not_load():
    # this process kept both cores busy (own 2 s over a 1 s window of 2 CPUs): nothing else ran
    fake = FakeStat(2)
    s = sampler_for(fake, [0, 1])
    a = s.snapshot()
    fake.advance((1.0, 1.0), own_s=2.0)
    assert s.free(a, s.snapshot()) == pytest.approx(2.0)
    # half of the busy time was another process
    a = s.snapshot()
    fake.advance((1.0, 1.0), own_s=1.0)
    assert s.free(a, s.snapshot()) == pytest.approx(1.0)


def test_unknown_load_uses_the_allowed_cpus():
    s = CpuSampler(read_stat=lambda: (_ for _ in ()).throw(OSError("no /proc")),
                   own_cpu=lambda: 0.0, cpus=[0, 1, 2], clk_tck=100)
    n, why = choose_threads(None, sampler=s, sleep=lambda _: None, quota=0)
    assert n == 3 and "unknown" in why
    assert threads_for(None, 4, quota=2) == 2


def test_requested_threads_win_and_are_checked():
    four = sampler_for(FakeStat(4), [0, 1, 2, 3])
    assert choose_threads(3, sampler=four) == (3, "as requested")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="threads"):
            choose_threads(bad)


def test_threads_beyond_the_machine_are_clamped_with_a_note(caplog):
    """--threads 100000 crashed train and build-pairs (OpenMP cannot start that many)."""
    two = sampler_for(FakeStat(2), [0, 1])
    with caplog.at_level("WARNING", logger="bpo_fast"):
        n, why = choose_threads(100000, sampler=two)
    assert n == 2 and "clamped" in why
    assert "100000 requested" in caplog.text and "offers 2 CPU" in caplog.text
    before = torch.get_num_threads()
    with runtime.threads_for_command(10 ** 5, adapt=False):   # the demo's path on CUDA
        assert torch.get_num_threads() <= len(runtime._affinity())
    assert torch.get_num_threads() == before


def test_governor_follows_the_free_cpus():
    fake = FakeStat(2)
    now = [0.0]
    set_to = []
    g = ThreadGovernor(interval=2.0, sampler=sampler_for(fake, [0, 1]), set_threads=set_to.append,
                       clock=lambda: now[0], quota=0)
    assert g.start(sleep=lambda _: fake.advance((0.0, 0.0))) == 2
    # our own 2 threads keep both cores busy: still 2
    fake.advance((1.0, 1.0), jiffies=200, own_s=4.0)
    now[0] = 2.5
    assert g.update() == 2
    # a busy process appears beside us: down to 1
    fake.advance((1.0, 1.0), jiffies=200, own_s=2.0)
    now[0] = 3.0
    assert g.update() == 2                      # not yet re-measured (interval)
    now[0] = 5.0
    assert g.update() == 1
    # it ends: back to 2
    fake.advance((1.0, 0.0), jiffies=200, own_s=2.0)
    now[0] = 7.5
    assert g.update() == 2
    assert set_to == [2, 1, 2]


def test_adapt_threads_is_a_no_op_without_use_threads(monkeypatch):
    monkeypatch.setattr(runtime, "_GOVERNOR", None)
    runtime.adapt_threads()          # nothing to do, no error


def test_use_threads_fixed_and_chosen():
    import torch

    before = torch.get_num_threads()
    try:
        assert runtime.use_threads(1) == 1 and torch.get_num_threads() == 1
        assert runtime._GOVERNOR is None                 # --threads: nothing adapts
        n = runtime.use_threads(None)                    # this machine, now: any allowed count
        assert 1 <= n <= len(runtime._affinity()) and torch.get_num_threads() == n
        assert runtime._GOVERNOR is not None
        runtime.adapt_threads()
    finally:
        runtime.release_threads()
        torch.set_num_threads(before)
    assert runtime._GOVERNOR is None


def test_threads_for_command_restores_the_count():
    from bpo_fast import runtime

    before = torch.get_num_threads()
    with runtime.threads_for_command(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before and runtime._GOVERNOR is None
    with runtime.threads_for_command(None, adapt=False):  # e.g. the demo on a GPU: untouched
        assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"):
        with runtime.threads_for_command(0):
            pass
    assert torch.get_num_threads() == before
