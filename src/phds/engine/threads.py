"""How many CPU threads a decode step uses, and how torch's OpenMP threads wait between parallel regions.

On a machine with as many torch threads as cores, a decode step beside another busy process (a tokenizer, a second
job) stalls: each of the step's few hundred parallel regions ends in a barrier that waits for a thread the
scheduler has just given to the other process, and threads that spin while they wait use up their share of the
CPU. `benchmarks/bench_busy_neighbour.py` (olmoe-1b-7b-shape, bf16, k=2, 2 cores, a busy Python loop beside it;
committed in benchmarks/results/busy_neighbour.json): with torch's defaults the eager engine went from 52 to 155 ms a
step (slowest 320 ms) and the compiled one from 26 to 51 ms (slowest 226 ms).

Two choices follow, made by `phds serve` and `phds bench` and printed when they start:

- `ThreadPolicy`: the eager engine uses every usable core less those other processes kept busy over the last
  quarter second (`BusyCores`, read from /proc/stat), at least one; re-read before each step. A compiled decode
  step is specialised on the thread count (a recompile per count), so the compiled engine keeps the count chosen
  at start-up.
- `wait_policy_env`: OpenMP threads spin 3000 iterations before they sleep (`GOMP_SPINCOUNT`; libgomp's default is
  300000), so a waiting thread gives its core back. With both, beside the busy process: the eager engine 80 ms a
  step on one thread, slowest 106; the compiled engine (two threads) 66 ms, slowest 75; idle, 56 and 27 ms.
  libgomp reads it once, when torch is imported, so the CLI restarts itself with it set (`restart_with_wait_policy`)
  unless the user set a wait policy of their own.
"""

from __future__ import annotations

import os
import sys
import time

import torch

SPIN_COUNT = 3000
_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), e.g. a container's share."""
    cores = _affinity()
    return len(cores) if cores is not None else os.cpu_count() or 1


def _affinity() -> set[int] | None:
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return None


def wait_policy_env(environ: dict[str, str] | os._Environ) -> dict[str, str]:
    """The environment variables to add so OpenMP threads give their core back soon: empty when the user chose a
    wait policy already, or torch's OpenMP is not GNU's (libgomp; other runtimes spell it differently)."""
    if any(name in environ for name in _WAIT_VARIABLES) or "GNU" not in _openmp_runtime():
        return {}
    return {"GOMP_SPINCOUNT": str(SPIN_COUNT)}


def describe_wait_policy(environ: dict[str, str] | os._Environ = os.environ) -> str:
    """The OpenMP wait policy this process runs with, in words."""
    chosen = [f"{name}={environ[name]}" for name in _WAIT_VARIABLES if name in environ]
    return ", ".join(chosen) if chosen else f"the OpenMP runtime's default ({_openmp_runtime()})"


def restart_with_wait_policy(argv: list[str]) -> None:
    """Re-run this command (`python -m phds.cli ARGS`) with `wait_policy_env` set, once; returns when nothing needs
    setting. The restart costs one more import of torch (a few seconds), before any model is loaded."""
    updates = wait_policy_env(os.environ)
    if not updates or os.environ.get("PHDS_RESTARTED"):
        return
    os.environ.update(updates, PHDS_RESTARTED="1")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "phds.cli", *argv[1:]])


def _openmp_runtime() -> str:
    info = torch.__config__.parallel_info()
    if "ATen parallel backend: OpenMP" not in info:
        return "no OpenMP"
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    names = os.listdir(lib) if os.path.isdir(lib) else []
    if any(name.startswith("libgomp") for name in names):
        return "GNU libgomp"
    if any(name.startswith("libiomp") for name in names):
        return "Intel libiomp"
    return "OpenMP"


class BusyCores:
    """Cores other processes kept busy between two readings: the busy CPU time of the cores this process may use
    (/proc/stat) less this process's own, over the wall time between them. Always 0 where /proc/stat is missing.

    Example: `busy = BusyCores(); time.sleep(0.25); busy.read()  # e.g. 1.0 beside one busy process`.
    """

    def __init__(self, stat_path: str = "/proc/stat"):
        self.stat_path = stat_path
        self._last = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        try:
            with open(self.stat_path) as stat:
                lines = [line.split() for line in stat if line.startswith("cpu") and line[3].isdigit()]
        except OSError:
            return None
        cores = _affinity()
        busy = 0
        for fields in lines:
            if cores is None or int(fields[0][3:]) in cores:
                # user nice system idle iowait irq softirq steal ...: busy is everything but idle and iowait
                ticks = [int(value) for value in fields[1:9]]
                busy += sum(ticks) - ticks[3] - ticks[4]
        return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), time.process_time()

    def read(self) -> float:
        """Cores others used since the last reading (or since this object was made)."""
        now, last = self._sample(), self._last
        self._last = now
        if now is None or last is None or now[0] <= last[0]:
            return 0.0
        others = (now[1] - last[1]) - (now[2] - last[2])
        return max(0.0, others / (now[0] - last[0]))


class ThreadPolicy:
    """Torch threads for the next decode step.

    Args:
        threads: a fixed count; None: every usable core, less the cores other processes keep busy (adaptive).
        adaptive: re-read the busy cores every `interval_s` (False: the count chosen when this object is made).
        interval_s: shortest time between two readings.

    Example: `policy = ThreadPolicy(); policy.apply()  # sets torch's thread count, returns it`.
    """

    def __init__(self, threads: int | None = None, *, adaptive: bool = True, interval_s: float = 0.25):
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"`threads` must be an integer >= 1 or None, got {threads!r}")
        self.cores = usable_cores()
        self.fixed = threads
        self.adaptive = adaptive and threads is None
        self.interval_s = interval_s
        self._busy = BusyCores()
        self._read_at = time.monotonic()
        if threads is None:
            time.sleep(interval_s)  # a first reading of the other processes
            threads = self._free_cores()
        self.threads = threads

    def _free_cores(self) -> int:
        self._read_at = time.monotonic()
        return max(1, min(self.cores, round(self.cores - self._busy.read())))

    def apply(self) -> int:
        """Set torch's thread count for the calling thread's next parallel work (re-reading the busy cores first
        when adaptive and `interval_s` has passed); returns it."""
        if self.adaptive and time.monotonic() - self._read_at >= self.interval_s:
            self.threads = self._free_cores()
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return self.threads

    def describe(self) -> str:
        """What this policy chose, in words (printed by `phds serve` and `phds bench` at start-up)."""
        if self.fixed is not None:
            count = f"{self.fixed} (as asked) of {self.cores} usable cores"
        elif self.adaptive:
            count = (
                f"{self.threads} now, of {self.cores} usable cores: fewer while other processes keep cores busy "
                f"(re-read every {self.interval_s:g} s)"
            )
        else:
            count = f"{self.threads}: the {self.cores} usable cores less those other processes kept busy at start-up"
        return f"CPU threads: {count}; OpenMP wait policy: {describe_wait_policy()}"
