"""The k='auto' policy: largest declared k meeting the per-token latency target, lowered as the queue grows."""

from __future__ import annotations

import pytest

from phds.serving import AutoKPolicy


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def policy(**overrides) -> AutoKPolicy:
    return AutoKPolicy(**{"ks": [1, 2, 4, 8], "target_ms": 20.0, "clock": _Clock(), **overrides})


def test_with_no_samples_the_largest_declared_k_is_chosen():
    assert policy().choose() == 8


def test_a_k_over_the_target_rules_out_itself_and_every_larger_k():
    auto = policy()
    auto.observe(2, 25.0)  # k=4 and k=8 have no samples but cannot be faster than k=2
    auto.observe(1, 5.0)
    assert auto.fast_enough() == [1]
    assert auto.choose() == 1


def test_the_median_of_recent_samples_decides_not_one_outlier():
    auto = policy()
    for ms in (10.0, 11.0, 90.0):
        auto.observe(8, ms)
    assert auto.latency_ms(8) == 11.0
    assert auto.choose() == 8


def test_when_nothing_meets_the_target_the_smallest_k_is_chosen():
    auto = policy()
    auto.observe(1, 50.0)
    assert auto.fast_enough() == [] and auto.choose() == 1


def test_each_queue_step_of_waiting_requests_lowers_k_by_one_declared_step():
    auto = policy(queue_step=4)
    assert [auto.choose(queue_depth=q) for q in (0, 3, 4, 8, 12, 100)] == [8, 8, 4, 2, 1, 1]


def test_old_samples_expire_so_a_k_ruled_out_under_load_is_tried_again():
    clock = _Clock()
    auto = policy(clock=clock, horizon_s=30.0)
    auto.observe(8, 40.0)
    assert auto.choose() == 4
    clock.now = 31.0
    assert auto.choose() == 8


def test_simulated_load_moves_k_down_as_load_rises_and_back_up_as_it_falls():
    # Per-token latency grows with k and with the number of requests sharing the batch.
    clock = _Clock()
    auto = policy(clock=clock, window=4, horizon_s=5.0)

    def serve_at(load: int) -> int:
        clock.now += 10.0  # a new phase: earlier samples have aged out
        for _ in range(3):  # a few requests per phase, each reporting its latency at the k it got
            k = auto.choose(queue_depth=max(0, load - 8))
            auto.observe(k, 1.0 * k * (1 + load / 2))
        return auto.choose(queue_depth=max(0, load - 8))

    chosen = [serve_at(load) for load in (0, 2, 6, 14, 40, 6, 0)]
    assert chosen[:5] == sorted(chosen[:5], reverse=True)  # never rises while the load rises
    assert chosen[0] == 8 and chosen[4] == 1
    assert chosen[-1] > chosen[4]  # recovers when the load drops


@pytest.mark.parametrize(
    ("field", "value"), [("ks", []), ("ks", [0, 2]), ("target_ms", 0.0), ("window", 0), ("queue_step", 0)]
)
def test_bad_settings_are_value_errors_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}`"):
        policy(**{field: value})


def test_negative_queue_depth_is_refused():
    with pytest.raises(ValueError, match="queue_depth"):
        policy().choose(queue_depth=-1)
