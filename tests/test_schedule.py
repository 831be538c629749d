"""PHDSSchedule: declared ks, sampling distribution, anchor ramp, determinism, validation."""

from __future__ import annotations

from collections import Counter

import pytest

from phds.schedule import PHDSSchedule, default_ks


def test_default_ks_run_from_half_k_pre_up_to_k_pre():
    assert default_ks(8) == [4, 5, 6, 7, 8]
    assert default_ks(4) == [2, 3, 4]
    assert default_ks(3) == [2, 3]
    assert PHDSSchedule(k_pre=8).ks == [4, 5, 6, 7, 8]


def test_anchor_defaults_to_the_lowest_declared_k():
    assert PHDSSchedule(ks=[4, 2, 3]).anchor_k == 2


def test_k_at_is_a_pure_function_of_seed_and_step():
    a = PHDSSchedule(ks=[2, 3, 4], seed=7)
    b = PHDSSchedule(ks=[4, 3, 2], seed=7)  # same set, other order
    assert [a.k_at(s, 500) for s in range(500)] == [b.k_at(s, 500) for s in range(500)]
    assert a.k_at(123, 500) == a.k_at(123, 500)
    # order of calls does not matter (no hidden RNG state)
    assert [a.k_at(s, 500) for s in reversed(range(500))] == list(reversed(a.sequence(500)))
    assert a.sequence(500) != PHDSSchedule(ks=[2, 3, 4], seed=8).sequence(500)


def test_uniform_draws_match_a_uniform_distribution_outside_the_anchor_phase():
    schedule = PHDSSchedule(ks=[2, 3, 4], anchor_fraction=0.0, seed=0)
    counts = Counter(schedule.sequence(30_000))
    for k in (2, 3, 4):
        assert abs(counts[k] / 30_000 - 1 / 3) < 0.015


def test_weighted_draws_follow_the_given_weights():
    schedule = PHDSSchedule(ks=[2, 4], weights=[1.0, 3.0], anchor_fraction=0.0, seed=1)
    counts = Counter(schedule.sequence(20_000))
    assert abs(counts[4] / 20_000 - 0.75) < 0.015
    assert schedule.mean_k() == pytest.approx(3.5)


def test_anchor_probability_ramps_linearly_from_its_weight_to_one():
    schedule = PHDSSchedule(ks=[2, 3, 4], anchor_k=2, anchor_fraction=0.1, seed=0)
    total = 1000  # anchor phase = the last 100 steps: 900..999
    assert schedule.probabilities(899, total) == pytest.approx([1 / 3] * 3)
    anchor_p = [schedule.probabilities(step, total)[0] for step in range(900, 1000)]
    steps = [(p - 1 / 3) / (2 / 3) for p in anchor_p]  # 0..1 share of the ramp done
    assert steps == pytest.approx([(i + 1) / 100 for i in range(100)])
    assert schedule.probabilities(999, total) == pytest.approx([1.0, 0.0, 0.0])
    # the other ks keep their relative weights while shrinking
    p = schedule.probabilities(950, total)
    assert p[1] == pytest.approx(p[2]) and sum(p) == pytest.approx(1.0)


def test_draws_in_the_anchor_phase_converge_to_the_anchor():
    schedule = PHDSSchedule(ks=[2, 3, 4], anchor_fraction=0.5, seed=3)
    total = 4000
    ks = schedule.sequence(total)
    first_half = Counter(ks[:2000])
    last_tenth = Counter(ks[3600:])
    assert abs(first_half[2] / 2000 - 1 / 3) < 0.04
    # expected anchor share over steps 3600..3999 is about 1/3 + 2/3 * 0.9 = 0.93
    assert last_tenth[2] / 400 > 0.88
    assert ks[-1] == 2


def test_anchor_fraction_zero_turns_the_curriculum_off():
    schedule = PHDSSchedule(ks=[2, 3, 4], anchor_fraction=0.0, seed=0)
    assert schedule.probabilities(99, 100) == pytest.approx([1 / 3] * 3)
    assert schedule.anchor_steps(100) == 0


def test_a_fixed_k_oracle_always_trains_at_its_k():
    schedule = PHDSSchedule.fixed(4)
    assert schedule.is_fixed
    assert set(schedule.sequence(200)) == {4}


def test_schedule_round_trips_through_a_dict():
    schedule = PHDSSchedule(ks=[2, 3, 4], weights=[1, 1, 2], anchor_k=3, anchor_fraction=0.2, seed=5)
    again = PHDSSchedule.from_dict(schedule.to_dict())
    assert again == schedule
    assert again.sequence(50) == schedule.sequence(50)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(ks=[]), "ks"),
        (dict(ks=[0, 2]), "ks"),
        (dict(ks=[2, 2]), "ks"),
        (dict(ks=[2, 3], anchor_k=4), "anchor_k"),
        (dict(ks=[2, 3], weights=[1.0]), "weights"),
        (dict(ks=[2, 3], weights=[-1.0, 2.0]), "weights"),
        (dict(ks=[2, 3], anchor_fraction=1.5), "anchor_fraction"),
        (dict(ks=[2, 3], seed=-1), "seed"),
        (dict(), "k_pre"),
    ],
)
def test_bad_fields_raise_a_value_error_naming_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PHDSSchedule(**kwargs)


def test_k_at_rejects_a_step_outside_the_run():
    schedule = PHDSSchedule(ks=[2, 3])
    with pytest.raises(ValueError, match="step"):
        schedule.k_at(10, 10)
    with pytest.raises(ValueError, match="total_steps"):
        schedule.k_at(0, 0)


# ----------------------------------------------------------------------------- layer-wise sampling

LAYERS = list(range(8))


def test_ks_at_is_a_pure_function_of_seed_step_and_layer():
    a = PHDSSchedule(ks=[2, 3, 4], seed=7, sampling="layer")
    b = PHDSSchedule(ks=[4, 3, 2], seed=7, sampling="layer")
    draws = [a.ks_at(s, 300, LAYERS) for s in range(300)]
    assert draws == [b.ks_at(s, 300, LAYERS) for s in range(300)]
    assert [a.ks_at(s, 300, LAYERS) for s in reversed(range(300))] == list(reversed(draws))
    # a layer's k does not depend on which other layers are asked for, or in which order
    assert all(a.ks_at(s, 300, [5, 1])[1] == draws[s][1] for s in range(300))
    assert all(a.ks_at(s, 300, [3]) == {3: draws[s][3]} for s in range(300))
    assert draws != [PHDSSchedule(ks=[2, 3, 4], seed=8).ks_at(s, 300, LAYERS) for s in range(300)]


def test_layer_draws_are_independent_of_each_other_and_of_the_global_draw():
    schedule = PHDSSchedule(ks=[2, 3, 4], anchor_fraction=0.0, seed=0, sampling="layer")
    steps = 6000
    draws = [schedule.ks_at(s, steps, LAYERS) for s in range(steps)]
    global_ks = schedule.sequence(steps)
    # independent uniform draws over 3 ks agree 1/3 of the time (a shared stream would agree always or never)
    for layer in LAYERS[1:]:
        agree = sum(d[0] == d[layer] for d in draws) / steps
        assert abs(agree - 1 / 3) < 0.03, layer
    for layer in LAYERS:
        agree = sum(d[layer] == k for d, k in zip(draws, global_ks, strict=True)) / steps
        assert abs(agree - 1 / 3) < 0.03, layer
    # the steps of a layer are not all alike either: a layer changes k between steps
    assert all(len({d[layer] for d in draws[:20]}) > 1 for layer in LAYERS)


def test_every_layer_draws_from_the_given_weights():
    schedule = PHDSSchedule(ks=[2, 4], weights=[1.0, 3.0], anchor_fraction=0.0, seed=1, sampling="layer")
    steps = 10_000
    counts = Counter()
    for s in range(steps):
        for layer, k in schedule.ks_at(s, steps, [0, 1, 2, 3]).items():
            counts[(layer, k)] += 1
    for layer in range(4):
        assert abs(counts[(layer, 4)] / steps - 0.75) < 0.02, layer


def test_the_anchor_ramp_brings_every_layer_to_the_anchor():
    schedule = PHDSSchedule(ks=[2, 3, 4], anchor_k=3, anchor_fraction=0.5, seed=3, sampling="layer")
    total = 4000
    draws = [schedule.ks_at(s, total, LAYERS) for s in range(total)]
    assert draws[-1] == {layer: 3 for layer in LAYERS}
    for layer in LAYERS:
        first_half = sum(d[layer] == 3 for d in draws[:2000]) / 2000
        last_tenth = sum(d[layer] == 3 for d in draws[3600:]) / 400
        assert abs(first_half - 1 / 3) < 0.04, layer
        assert last_tenth > 0.88, layer  # expected about 1/3 + 2/3 * 0.9 = 0.93


def test_dialled_at_is_the_global_k_or_the_per_layer_ks_by_sampling():
    global_schedule = PHDSSchedule(ks=[1, 2, 3, 4], seed=2)
    layer_schedule = PHDSSchedule(ks=[1, 2, 3, 4], seed=2, sampling="layer")
    assert global_schedule.sampling == "global"
    for step in range(20):
        assert global_schedule.dialled_at(step, 20, [0, 1]) == global_schedule.k_at(step, 20)
        assert layer_schedule.dialled_at(step, 20, [0, 1]) == layer_schedule.ks_at(step, 20, [0, 1])
    assert PHDSSchedule.fixed(3).ks_at(5, 10, [0, 2]) == {0: 3, 2: 3}


def test_sampling_round_trips_through_a_dict_and_old_dicts_read_as_global():
    schedule = PHDSSchedule(ks=[2, 3, 4], seed=5, sampling="layer")
    assert PHDSSchedule.from_dict(schedule.to_dict()) == schedule
    old = {key: value for key, value in schedule.to_dict().items() if key != "sampling"}
    assert PHDSSchedule.from_dict(old).sampling == "global"


def test_bad_sampling_or_layers_raise_a_value_error_naming_them():
    with pytest.raises(ValueError, match="`sampling`.*'token'"):
        PHDSSchedule(ks=[2, 3], sampling="token")
    schedule = PHDSSchedule(ks=[2, 3], sampling="layer")
    for layers in ([], [-1], [0.5], [True]):
        with pytest.raises(ValueError, match="`layers`"):
            schedule.ks_at(0, 10, layers)
