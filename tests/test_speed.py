"""The speed package: the measured cost model and its cache, the line that finds the largest rank
faster than dense, the interleaved generation timing, and speed-aware ranks on a causal LM."""

from __future__ import annotations

import json

import pytest
import torch

from svdkit.speed import (
    GenerationSpeed,
    MeasuredCosts,
    SpeedTarget,
    TokenTimes,
    best_times,
    cost_model,
    default_rank_multiple,
    generation_speed,
    speed_ratios,
    using_costs,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_largest_faster_rank_is_where_the_fitted_line_meets_the_dense_time():
    # time = 1 + 0.1 k: meets 0.98 * 10 = 9.8 at k = 88
    times = TokenTimes(1, 1, 10.0, {k: 1 + 0.1 * k for k in (30, 55, 75, 90, 100)})
    assert times.largest_faster_rank(0.02, limit=200) == 88
    assert times.largest_faster_rank(0.02, limit=50) == 50  # never above the break-even limit
    # one disturbed point of five does not move the Theil-Sen line
    noisy = TokenTimes(1, 1, 10.0, {**times.factorized, 55: 40.0})
    assert noisy.largest_faster_rank(0.02, limit=200) == 88
    # slower than dense at every rank: none
    assert TokenTimes(1, 1, 1.0, {k: 2 + 0.1 * k for k in (8, 16)}).largest_faster_rank(0.0, limit=100) == 0
    # times that fall with the rank (noise): the largest measured rank under the threshold
    assert TokenTimes(1, 1, 3.5, {8: 4.0, 16: 3.0, 24: 2.0}).largest_faster_rank(0.0, limit=100) == 24
    assert TokenTimes(1, 1, 2.5, {8: 4.0, 16: 3.0, 24: 2.6}).largest_faster_rank(0.0, limit=100) == 0


def test_default_rank_multiple():
    assert default_rank_multiple("cpu") == 8 and default_rank_multiple("cuda") == 8 and default_rank_multiple("meta") == 1
    assert default_rank_multiple("cpu", (576, 576)) == 8  # break-even 288 >= 16 x 8
    assert default_rank_multiple("cpu", (200, 200)) == 1  # break-even 100: exact ranks


@pytest.mark.parametrize("field, value, message", [
    ("device", "warp-drive", "SpeedTarget device"), ("dtype", "int8", "SpeedTarget dtype: expected a floating-point"),
    ("threads", 0, "SpeedTarget threads"), ("tokens", (), "SpeedTarget tokens"), ("margin", 1.0, "SpeedTarget margin"),
])
def test_speed_target_refuses_bad_fields(field, value, message):
    with pytest.raises(ValueError, match=message):
        SpeedTarget(**{field: value})


def test_measured_costs_are_cached_per_shape_and_read_back_without_timing(tmp_path, monkeypatch):
    target = SpeedTarget(threads=1, tokens=(1, 32))
    costs = MeasuredCosts(target, directory=tmp_path, rounds=1)
    cap = costs.largest_faster_rank(96, 64)
    assert 0 <= cap <= 96 * 64 // (96 + 64)
    data = json.loads(costs.path.read_text())
    assert data["key"] == target.key() and set(data["shapes"]["96x64"]) == {"1", "32"}
    entry = data["shapes"]["96x64"]["1"]
    assert entry["dense"] > 0 and all(t > 0 for t in entry["factorized"].values())
    assert all(int(k) % 1 == 0 for k in entry["factorized"])

    def no_timing(*args, **kwargs):
        raise AssertionError("a cached shape was timed again")

    again = MeasuredCosts(target, directory=tmp_path, rounds=1)
    monkeypatch.setattr(again, "_measure", no_timing)
    assert again.largest_faster_rank(96, 64) == cap  # the same cap, from the file
    times = again.times(96, 64, 32)
    assert times.dense == pytest.approx(data["shapes"]["96x64"]["32"]["dense"])
    # another key (dtype) is another file: nothing is shared with the float32 measurements
    other = MeasuredCosts(SpeedTarget(threads=1, tokens=(1,), dtype="bfloat16"), directory=tmp_path, rounds=1)
    assert other.path != costs.path


def test_a_cache_file_of_another_key_is_ignored(tmp_path):
    target = SpeedTarget(threads=1, tokens=(1,))
    costs = MeasuredCosts(target, directory=tmp_path, rounds=1)
    costs.path.parent.mkdir(parents=True)
    costs.path.write_text(json.dumps({"key": {"device": "elsewhere"}, "shapes": {"64x64": {"1": {"tokens": 1, "measured_tokens": 1,
                                      "dense": 1.0, "factorized": {"8": 0.0}}}}}))
    assert costs.times(64, 64, 1).factorized != {8: 0.0}  # measured here, not read from a stranger's file


def test_cost_model_switches(monkeypatch):
    target = SpeedTarget(threads=1)
    monkeypatch.setenv("SVDKIT_NO_SPEED_CAPS", "1")
    assert cost_model(target) is None
    sentinel = object()
    with using_costs(sentinel):
        assert cost_model(target) is sentinel
    monkeypatch.setenv("SVDKIT_NO_SPEED_CAPS", "0")
    assert isinstance(cost_model(target), MeasuredCosts)


def test_best_times_interleaves_and_keeps_the_best_round():
    calls = []
    best = best_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1)
    assert calls == ["a", "b"] * 4 and set(best) == {"a", "b"} and all(t >= 0 for t in best.values())


def test_generation_speed_times_each_model_on_the_same_work(lm_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    timed = generation_speed({"a": model, "b": model}, batches=(1, 2), new_tokens=3, prompt_tokens=4, prefill=(2, 8), rounds=1)
    for speed in timed.values():
        assert set(speed.decode) == {1, 2} and all(v > 0 for v in speed.decode.values()) and speed.prefill > 0
        assert speed.settings["new_tokens"] == 3 and speed.settings["prefill"] == [2, 8]
    with pytest.raises(ValueError, match="batch 0 must be an int >= 1"):
        generation_speed({"a": model}, batches=(0,))
    with pytest.raises(ValueError, match="no config.vocab_size"):
        generation_speed({"mlp": torch.nn.Linear(2, 2)})


def test_speed_ratios():
    fast = GenerationSpeed({1: 30.0, 8: 100.0}, 2.0)
    dense = GenerationSpeed({1: 20.0, 8: 125.0, 32: 300.0}, 3.0)
    assert speed_ratios(fast, dense) == {"decode b1 x": 1.5, "decode b8 x": 0.8, "prefill x": 1.5}


def test_a_causal_lm_budget_is_speed_aware_by_default(lm_dir):
    """With the default ``speed_aware="auto"``, a causal LM with a budget asks the cost model for
    every Linear's cap; a layer that no rank speeds up stays dense, with the reason."""
    from transformers import AutoModelForCausalLM

    from svdkit.compression import CompressConfig, compress

    model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()

    class NothingPays:
        target = SpeedTarget()
        asked = 0

        def largest_faster_rank(self, m, n):
            NothingPays.asked += 1
            return 0

        def describe(self):
            return "no rank pays"

    ids = torch.randint(1, 300, (4, 16), generator=torch.Generator().manual_seed(0))
    with using_costs(NothingPays()), pytest.raises(ValueError, match=r"must stay dense because no rank of theirs runs faster .* "
                                                                    r"--speed-aware off"):
        compress(model, CompressConfig(method="svd", budget=0.9), [ids])  # the budget cannot hold with every layer dense
    with using_costs(NothingPays()):
        _, report = compress(model, CompressConfig(method="svd", budget=1.0), [ids])
    assert NothingPays.asked >= len(report.layers)
    assert all(row.rank is None and "kept dense for speed" in row.skip_reason for row in report.layers)
    assert report.totals()["dense_for_speed"] == len(report.layers)
