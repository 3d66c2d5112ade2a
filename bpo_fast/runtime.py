"""Where and in what precision a command runs: one place for device, dtype and process-group
setup, used by ``train``, ``ref-logps`` and ``build-pairs``.

Vocabulary (the same in every command): devices ``cpu``, ``cuda``, ``cuda:N`` (default: CUDA
when available, ``cuda:LOCAL_RANK`` under torchrun); dtypes ``auto``, ``fp32``, ``bf16``,
``fp16`` (``float32``, ``bfloat16``, ``float16`` accepted too; ``auto``: bf16 on CUDA -- fp16
where the GPU has no bf16 -- and fp32 on the CPU).
"""

import contextlib
import logging
import math
import os
import time

import torch

from bpo_fast.options import canonical_dtype

__all__ = ["DTYPES", "parse_dtype", "resolve_device", "dist_env", "init_distributed",
           "CpuSampler", "choose_threads", "ThreadGovernor", "use_threads", "adapt_threads",
           "default_num_workers", "choose_num_workers"]

logger = logging.getLogger("bpo_fast")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name, device=None):
    """A dtype name (or ``torch.dtype``) -> the ``torch.dtype``; ``auto`` depends on ``device``."""
    if isinstance(name, torch.dtype):
        return name
    try:
        key = "auto" if name is None else canonical_dtype(name)
    except Exception:
        raise ValueError(f"dtype: expected 'auto' or one of {list(DTYPES)} (or float32, "
                         f"bfloat16, float16), got {name!r}") from None
    if key != "auto":
        return DTYPES[key]
    dev = torch.device(device) if device is not None else \
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def dist_env(rank=None, world_size=None):
    """(rank, world_size, local_rank) from the arguments or torchrun's environment."""
    r = int(os.environ.get("RANK", 0)) if rank is None else int(rank)
    w = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else int(world_size)
    lr = int(os.environ.get("LOCAL_RANK", r if w > 1 else 0))
    if w < 1 or not 0 <= r < w:
        raise ValueError(f"rank/world_size: expected 0 <= rank < world_size, got {r}/{w}")
    return r, w, lr


def resolve_device(device=None, local_rank=0):
    """``device`` (or the default) as a ``torch.device``; a bare ``cuda`` becomes
    ``cuda:local_rank``. Asking for CUDA where there is none is an error naming ``device``."""
    if device is None:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} requested but CUDA is not available")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def init_distributed(device=None):
    """Join torchrun's process group when there is one (nccl on CUDA, else gloo); returns
    ``(world, rank, device)`` with the CUDA device made current."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        world, rank = 1, 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return world, rank, dev


def quiet_libraries():
    """Keep the libraries' own progress bars and info chatter (transformers' weight loading and
    saving, huggingface_hub) out of our output: a command shows one progress display, its own."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_warning()
    except ImportError:  # pragma: no cover
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass


class console:
    """``with console():`` around a long command: INFO logging of ``bpo_fast`` to stderr, written
    through tqdm so that log lines never tear the progress bar, and the libraries kept quiet."""

    def __enter__(self):
        import logging

        from tqdm.contrib.logging import logging_redirect_tqdm

        quiet_libraries()
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        self._redirect = logging_redirect_tqdm()
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc):
        return self._redirect.__exit__(*exc)


# ---------------------------------------------------------------------------------------------
# CPU threads from the CPUs actually free
#
# A CPU command with more torch intra-op threads than free cores collapses: OpenMP's threads
# meet at a barrier after every op, and a thread that shares its core with another process waits
# a scheduler time slice (milliseconds) for its turn, so each op costs a time slice instead of
# microseconds (measured on 2 cores with one busy process beside the demo: 2 threads ran the SFT
# step 10x slower than 1 thread). So the thread count follows the cores other processes leave
# free, measured over a short window from /proc/stat:
#
# - /proc/stat, not os.getloadavg(): the load average is a 1-, 5-, 15-minute exponential
#   average of runnable tasks; it lags a change by tens of seconds, it counts this process's own
#   threads (after a stage ran on 2 threads it reads ~2 and would halve the next stage), and in a
#   container it counts tasks the cgroup never competes with. /proc/stat's per-CPU jiffies over
#   ~150 ms say what the CPUs did just now; this process's own CPU time in the window
#   (time.process_time(), all its threads) is subtracted, so the same measurement also works
#   between training steps, while the process itself is busy.
# - only the CPUs of the affinity mask count (os.sched_getaffinity), and a cgroup CPU quota
#   (cgroup v2 cpu.max) caps the count.
# - a core counts as free when at least FREE_FRACTION of it is free: sharing a core with a
#   process that takes more than ~20% of it already costs the barrier stalls above.
# ---------------------------------------------------------------------------------------------

FREE_FRACTION = 0.8


def _read_proc_stat(path="/proc/stat"):
    """``{cpu index: (busy jiffies, total jiffies)}`` from a /proc/stat text (a path)."""
    out = {}
    with open(path, encoding="ascii") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *vals = line.split()
            try:
                cpu = int(name[3:])
                v = [int(x) for x in vals]
            except ValueError:
                continue
            idle = v[3] + (v[4] if len(v) > 4 else 0)           # idle + iowait
            total = sum(v[:8])                                    # guest is inside user already
            out[cpu] = (total - idle, total)
    return out


def _affinity():
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def default_num_workers(limit=4):
    """Worker processes for a command's DataLoader when the user names none: ``limit``, but
    never more than the CPUs this process may use (the maximum torch's DataLoader suggests;
    above it torch warns, and on a small machine the workers only take CPU from the model)."""
    return max(0, min(limit, len(_affinity())))


def choose_num_workers(requested, name="num_workers"):
    """DataLoader worker processes for ``requested`` (``--num-workers``): above the CPUs this
    process may use it is clamped, with a note (10000 workers would fork 10000 processes: the
    run would never start)."""
    if requested is None:
        return default_num_workers()
    cpus = len(_affinity())
    if requested > cpus:
        logger.warning("%s: %d requested, this machine offers %d CPU(s) to this process; "
                       "using %d", name, requested, cpus, cpus)
        return cpus
    return requested


def _cgroup_quota(path="/sys/fs/cgroup/cpu.max"):
    """CPUs allowed by a cgroup v2 quota (``"max"`` or none: None)."""
    try:
        with open(path, encoding="ascii") as f:
            quota, period = f.read().split()[:2]
        if quota == "max":
            return None
        return max(1, int(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


class CpuSampler:
    """Snapshots of the CPUs' busy time and this process's CPU time; :meth:`free` says how many
    of the allowed CPUs the other processes left free between two snapshots.

    Everything it reads can be injected (tests): ``read_stat()`` -> ``{cpu: (busy, total)}``
    jiffies, ``own_cpu()`` -> seconds of CPU this process used, ``cpus``: the allowed CPUs,
    ``clk_tck``: jiffies per second. Without /proc/stat (not Linux) :meth:`free` returns None.
    """

    def __init__(self, *, read_stat=None, own_cpu=None, cpus=None, clk_tck=None):
        self.read_stat = read_stat or _read_proc_stat
        self.own_cpu = own_cpu or time.process_time
        self.cpus = list(cpus) if cpus is not None else _affinity()
        if clk_tck is None:
            try:
                clk_tck = os.sysconf("SC_CLK_TCK")
            except (AttributeError, ValueError, OSError):
                clk_tck = 100
        self.clk_tck = clk_tck

    def snapshot(self):
        try:
            stat = self.read_stat()
        except OSError:
            stat = None
        return stat, self.own_cpu()

    def free(self, before, after):
        """Free CPUs (a float in [0, len(cpus)]) between two snapshots, or None when unknown
        (no /proc/stat, or no time passed on the allowed CPUs)."""
        (s0, own0), (s1, own1) = before, after
        if s0 is None or s1 is None:
            return None
        busy = total = 0
        for c in self.cpus:
            if c in s0 and c in s1:
                busy += s1[c][0] - s0[c][0]
                total += s1[c][1] - s0[c][1]
        if total <= 0:
            return None
        n = len(self.cpus)
        own = max(0.0, own1 - own0) * self.clk_tck   # this process's share, in jiffies
        others = min(max(0.0, busy - own), total)
        return n * (1.0 - others / total)


def threads_for(free, cpus, quota=None):
    """The thread count for ``free`` free CPUs (None: unknown) out of ``cpus`` allowed."""
    cap = min(cpus, quota) if quota else cpus
    if free is None:
        return max(1, cap)
    return max(1, min(cap, math.floor(free + (1.0 - FREE_FRACTION) + 1e-9)))


def choose_threads(requested=None, *, sample_s=0.15, sampler=None, sleep=time.sleep,
                   quota=None):
    """torch intra-op threads for a CPU command: ``requested`` when given (``--threads``),
    else the CPUs of the affinity mask that other processes leave free over ``sample_s``
    seconds (see the notes above). Returns ``(threads, why)``; ``why`` is a short phrase for the
    log."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"threads: expected a positive integer, got {requested!r}")
        cpus = len(sampler.cpus) if sampler is not None else len(_affinity())
        if requested > cpus:  # OpenMP cannot start 100000 threads: it crashes the process
            logger.warning("threads: %d requested, this machine offers %d CPU(s) to this "
                           "process; using %d", requested, cpus, cpus)
            return cpus, f"clamped from {requested} to the CPUs allowed"
        return requested, "as requested"
    sampler = sampler or CpuSampler()
    quota = _cgroup_quota() if quota is None else quota
    a = sampler.snapshot()
    sleep(sample_s)
    free = sampler.free(a, sampler.snapshot())
    n = threads_for(free, len(sampler.cpus), quota)
    if free is None:
        return n, f"{len(sampler.cpus)} CPUs allowed (no /proc/stat: load unknown)"
    return n, (f"{free:.1f} of {len(sampler.cpus)} allowed CPUs free over {sample_s * 1000:.0f} ms"
               + (f", cgroup quota {quota}" if quota else ""))


class ThreadGovernor:
    """Keeps torch's intra-op thread count at the free CPUs while a long CPU job runs.

    :meth:`start` chooses the count (:func:`choose_threads`) and sets it; :meth:`update`, called
    between steps or batches, re-measures at most every ``interval`` seconds (cheap: one read of
    /proc/stat, no sleep: this process's own CPU time is subtracted) and changes the count when
    the free CPUs changed. ``set_threads`` and ``clock`` can be injected (tests)."""

    def __init__(self, *, interval=2.0, sampler=None, set_threads=None, clock=time.monotonic,
                 quota=None):
        self.interval = interval
        self.sampler = sampler or CpuSampler()
        self.set_threads = set_threads or torch.set_num_threads
        self.clock = clock
        self.quota = _cgroup_quota() if quota is None else quota
        self.threads = None
        self.changes = []          # (threads, free) each time the count was set
        self._last = None
        self._t = None

    def start(self, sample_s=0.15, sleep=time.sleep):
        n, why = choose_threads(None, sample_s=sample_s, sampler=self.sampler, sleep=sleep,
                                quota=self.quota)
        self._set(n, None)
        logger.info("threads: %d (%s; --threads N overrides)", n, why)
        self._last, self._t = self.sampler.snapshot(), self.clock()
        return n

    def _set(self, n, free):
        if n != self.threads:
            self.set_threads(n)
            self.threads = n
            self.changes.append((n, free))

    def update(self):
        """Re-measure when ``interval`` seconds passed since the last measurement; returns the
        thread count now."""
        now = self.clock()
        if self._t is None or now - self._t < self.interval:
            return self.threads
        snap = self.sampler.snapshot()
        free = self.sampler.free(self._last, snap)
        self._last, self._t = snap, now
        n = threads_for(free, len(self.sampler.cpus), self.quota)
        if n != self.threads:
            logger.info("threads: %d -> %d (%.1f of %d allowed CPUs free over the last %.0f s)",
                        self.threads, n, free, len(self.sampler.cpus), self.interval)
            self._set(n, free)
        return self.threads


_GOVERNOR = None


def use_threads(threads=None, *, interval=2.0):
    """Set torch's CPU threads for a command: ``threads`` fixed (``--threads N``), or, with
    None, chosen from the free CPUs and kept there by :func:`adapt_threads` calls in the
    long loops. Also keeps the inter-op pool at one thread where that can still be set (the
    commands run no inter-op parallel work; the call is allowed once, before any parallel
    work, so later calls leave it as it is). Returns the thread count set now."""
    global _GOVERNOR
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    if threads is not None:
        n, why = choose_threads(threads)
        torch.set_num_threads(n)
        _GOVERNOR = None
        logger.info("threads: %d (--threads, %s)", n, why)
        return n
    _GOVERNOR = ThreadGovernor(interval=interval)
    return _GOVERNOR.start()


def release_threads():
    """Stop adapting (the end of the command that called :func:`use_threads`)."""
    global _GOVERNOR
    _GOVERNOR = None


def adapt_threads():
    """Between steps of a long CPU loop: follow the free CPUs when :func:`use_threads` chose the
    count (a no-op otherwise, e.g. with ``--threads`` or in library use)."""
    if _GOVERNOR is not None:
        _GOVERNOR.update()


@contextlib.contextmanager
def threads_for_command(threads=None, adapt=True):
    """torch's CPU threads for one command (``--threads``, else, with ``adapt``, the free CPUs,
    followed by the :func:`adapt_threads` calls of its loops); the previous count is restored
    after."""
    before = torch.get_num_threads()
    if adapt:
        use_threads(threads)
    elif threads:
        torch.set_num_threads(choose_threads(threads)[0])
    try:
        yield
    finally:
        release_threads()
        torch.set_num_threads(before)
