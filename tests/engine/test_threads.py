"""The CPU thread count and OpenMP wait policy of decode (`phds.engine.threads`): busy cores read from /proc/stat,
an adaptive count that follows them, the restart that sets the wait policy, and the engine and server using them.
(Whether they prevent stalls is measured, not asserted: benchmarks/bench_busy_neighbour.py.)"""

from __future__ import annotations

import pytest
import torch

import phds
from phds.engine import Engine, SamplingParams
from phds.engine import threads as threads_module
from phds.engine.threads import BusyCores, ThreadPolicy, restart_with_wait_policy, wait_policy_env


@pytest.fixture(autouse=True)
def keep_torch_threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def _stat(path, busy_ticks: dict[int, int], idle: int = 1000) -> None:
    lines = ["cpu 0 0 0 0 0 0 0 0 0 0"]  # the machine's total line is not read
    for core, busy in busy_ticks.items():
        # user nice system idle iowait irq softirq steal guest guest_nice
        lines.append(f"cpu{core} {busy} 0 0 {idle} 7 0 0 0 0 0")
    path.write_text("\n".join(lines) + "\n")


def test_busy_cores_are_the_usable_cores_busy_time_less_this_process_own_over_wall_time(tmp_path, monkeypatch):
    clock = {"wall": 100.0, "own": 5.0}
    monkeypatch.setattr(threads_module.time, "monotonic", lambda: clock["wall"])
    monkeypatch.setattr(threads_module.time, "process_time", lambda: clock["own"])
    monkeypatch.setattr(threads_module, "_affinity", lambda: {0, 1})
    monkeypatch.setattr(threads_module.os, "sysconf", lambda name: 100)  # ticks per second
    stat = tmp_path / "stat"
    _stat(stat, {0: 1000, 1: 1000, 2: 1000})
    busy = BusyCores(str(stat))
    # 2 s later: cores 0 and 1 were busy 1.5 s each (3 core-seconds), of which this process used 1 core-second;
    # core 2 is outside the affinity and its 2 busy seconds do not count
    clock.update(wall=102.0, own=6.0)
    _stat(stat, {0: 1150, 1: 1150, 2: 1200}, idle=1050)
    assert busy.read() == pytest.approx((3.0 - 1.0) / 2.0)
    clock.update(wall=103.0, own=7.0)  # nothing but this process since: no other process is busy
    _stat(stat, {0: 1200, 1: 1200, 2: 1300}, idle=1100)
    assert busy.read() == 0.0


def test_busy_cores_read_zero_without_proc_stat(tmp_path):
    assert BusyCores(str(tmp_path / "missing")).read() == 0.0


@pytest.mark.parametrize("others, expected", [(0.0, 4), (0.4, 4), (1.0, 3), (2.6, 1), (7.0, 1)])
def test_adaptive_policy_leaves_other_processes_their_busy_cores_and_keeps_at_least_one(monkeypatch, others, expected):
    monkeypatch.setattr(threads_module, "usable_cores", lambda: 4)
    monkeypatch.setattr(BusyCores, "read", lambda self: others)
    policy = ThreadPolicy(interval_s=0.0)
    assert policy.threads == expected and policy.adaptive
    assert policy.apply() == expected and torch.get_num_threads() == expected


def test_adaptive_policy_follows_the_busy_cores_at_most_once_an_interval(monkeypatch):
    monkeypatch.setattr(threads_module, "usable_cores", lambda: 2)
    readings = iter([0.0, 1.0, 0.0])
    monkeypatch.setattr(BusyCores, "read", lambda self: next(readings))
    clock = {"now": 0.0}
    monkeypatch.setattr(threads_module.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(threads_module.time, "sleep", lambda seconds: clock.update(now=clock["now"] + seconds))
    policy = ThreadPolicy(interval_s=0.25)
    assert policy.apply() == 2
    clock["now"] += 0.1
    assert policy.apply() == 2  # too soon to read again
    clock["now"] += 0.2
    assert policy.apply() == 1 and torch.get_num_threads() == 1  # another process took a core
    clock["now"] += 0.3
    assert policy.apply() == 2 and torch.get_num_threads() == 2  # and gave it back


def test_fixed_and_start_up_policies_do_not_change(monkeypatch):
    monkeypatch.setattr(threads_module, "usable_cores", lambda: 2)
    monkeypatch.setattr(BusyCores, "read", lambda self: 1.0)
    fixed = ThreadPolicy(2)
    assert (fixed.threads, fixed.adaptive) == (2, False) and "2 (as asked)" in fixed.describe()
    at_start = ThreadPolicy(adaptive=False, interval_s=0.0)
    monkeypatch.setattr(BusyCores, "read", lambda self: 0.0)
    assert at_start.apply() == 1 and at_start.apply() == 1
    assert "at start-up" in at_start.describe()
    with pytest.raises(ValueError, match="threads"):
        ThreadPolicy(0)


def test_wait_policy_is_left_to_a_user_who_chose_one():
    assert wait_policy_env({"OMP_WAIT_POLICY": "ACTIVE"}) == {}
    assert wait_policy_env({"GOMP_SPINCOUNT": "0"}) == {}
    if "GNU" in threads_module._openmp_runtime():
        assert wait_policy_env({}) == {"GOMP_SPINCOUNT": str(threads_module.SPIN_COUNT)}


def test_restart_sets_the_wait_policy_and_reruns_the_same_command_once(monkeypatch):
    monkeypatch.setattr(threads_module, "wait_policy_env", lambda environ: {"GOMP_SPINCOUNT": "3000"})
    for name in ("GOMP_SPINCOUNT", "PHDS_RESTARTED"):
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(threads_module.os, "execv", lambda path, argv: calls.append(argv))
    restart_with_wait_policy(["/bin/phds", "serve", "tiny:olmoe", "--port", "0"])
    assert calls == [[threads_module.sys.executable, "-m", "phds.cli", "serve", "tiny:olmoe", "--port", "0"]]
    assert threads_module.os.environ["GOMP_SPINCOUNT"] == "3000"
    restart_with_wait_policy(["/bin/phds", "serve", "tiny:olmoe"])  # the restarted process: no second restart
    assert len(calls) == 1


def test_engine_applies_its_policy_before_every_step(monkeypatch):
    monkeypatch.setattr(BusyCores, "read", lambda self: 0.0)
    policy = ThreadPolicy(1)
    applied = []
    monkeypatch.setattr(policy, "apply", lambda: applied.append(torch.get_num_threads()) or 1)
    engine = Engine(phds.tiny_model("olmoe"), threads=policy)
    engine.generate([[1, 5, 9]], 2, SamplingParams(max_new_tokens=3))
    assert len(applied) == 3  # prefill with the first token, then two decode steps


def test_a_compiled_engine_refuses_an_adaptive_thread_count(monkeypatch):
    monkeypatch.setattr(BusyCores, "read", lambda self: 0.0)
    with pytest.raises(ValueError, match="fixed thread count"):
        Engine(phds.tiny_model("olmoe"), compile=True, threads=ThreadPolicy(interval_s=0.0))
