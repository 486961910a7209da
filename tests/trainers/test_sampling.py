"""RSO rejection sampling and pairing against the algorithm's probabilities, and `sample pairs`
end to end on a tiny local model."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from trainers.sampling import (
    SamplePairsConfig,
    best_and_worst,
    load_sample_config,
    pair_first_round,
    pair_tournament,
    rejection_sample,
    rso_round,
    sample_pairs,
)

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests" / "train"

REWARDS = [1.0, 0.5, 0.0, -1.0, 1.0]
BETA = 0.5


def test_one_round_accepts_with_probability_exp_r_minus_rmax_over_beta():
    rng = random.Random(0)
    trials = 20000
    counts = [0] * len(REWARDS)
    for _ in range(trials):
        for i in rso_round(REWARDS, range(len(REWARDS)), BETA, rng, room=len(REWARDS)):
            counts[i] += 1
    # r_max = 1: exp(0) = 1, exp(-1) = 0.3679, exp(-2) = 0.1353, exp(-4) = 0.0183, 1
    expected = [1.0, math.exp(-1), math.exp(-2), math.exp(-4), 1.0]
    for got, want in zip(counts, expected):
        assert abs(got / trials - want) < 0.012  # 3.5 standard errors at p = 0.37


def test_rejection_sampling_is_without_replacement_and_stops_at_k():
    rng = random.Random(1)
    seen_low = 0
    for _ in range(2000):
        accepted = rejection_sample(REWARDS, 3, BETA, rng)
        assert len(accepted) == 3 == len(set(accepted))
        assert {0, 4} & set(accepted)  # a best candidate is always accepted in round one
        seen_low += 3 in accepted
    assert seen_low > 0  # the worst one can be drawn once better ones have left the pool
    assert sorted(rejection_sample(REWARDS, 5, BETA, rng)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="cannot accept 6 of 5"):
        rejection_sample(REWARDS, 6, BETA, rng)


def test_pairings():
    rewards = [0.1, 0.9, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4]
    first = pair_first_round(range(8), rewards, random.Random(0))
    assert len(first) == 4 and len({i for p in first for i in p}) == 8
    assert all(rewards[w] > rewards[lo] for w, lo in first)
    tour = pair_tournament(range(8), rewards, random.Random(0))
    assert len(tour) == 7 and all(rewards[w] > rewards[lo] for w, lo in tour)
    assert max(rewards[w] for w, _ in tour) == 0.9  # the best one wins the final
    assert pair_first_round([0, 1], [0.5, 0.5], random.Random(0)) == []  # ties teach nothing


def test_best_and_worst():
    rng = random.Random(0)
    assert best_and_worst([0.2, 0.9, -1.0, 0.5], "lowest", rng) == (1, 2)
    assert best_and_worst([1.0, 1.0], "lowest", rng) is None
    assert {best_and_worst([0.2, 0.9, -1.0], "random", rng)[1] for _ in range(50)} == {0, 2}


def test_sample_pairs_end_to_end(tiny_model, tmp_path):
    out = tmp_path / "pairs.jsonl"
    config = load_sample_config(SamplePairsConfig, MANIFESTS / "sample_pairs_tiny.yaml", [
        f"model.path={tiny_model}", f"output={out}", "data.max_examples=6",
        "reward.function=grpo_rewards:digit_fraction", "generation.max_completion_length=8"])
    assert sample_pairs(config) == out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and len(rows) <= 6
    for row in rows:
        assert row["chosen_reward"] > row["rejected_reward"]
        assert {"prompt", "chosen", "rejected", "answer"} <= set(row)
    # hybrid: the reference solution (mostly digits) joined the candidates and usually wins
    assert any(r["chosen_source"] == "answer" for r in rows)
    assert not out.with_suffix(".jsonl.tmp").exists()


def test_sample_rso_end_to_end(tiny_model, tmp_path):
    from trainers.sampling import SampleRSOConfig, sample_rso

    out = tmp_path / "rso.jsonl"
    config = load_sample_config(SampleRSOConfig, MANIFESTS / "sample_rso_tiny.yaml", [
        f"model.path={tiny_model}", f"output={out}", "data.max_examples=3",
        "reward.function=grpo_rewards:digit_fraction", "generation.num_samples=6",
        "rso.num_accepted=4", "rso.pairing=first_round", "generation.max_completion_length=8"])
    sample_rso(config)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert 0 < len(rows) <= 3 * 2  # first round: K/2 = 2 pairs per prompt, ties dropped
    assert all(r["chosen_reward"] > r["rejected_reward"] for r in rows)
    for prompt in {r["prompt"] for r in rows}:
        texts = [t for r in rows if r["prompt"] == prompt for t in (r["chosen"], r["rejected"])]
        assert len(texts) <= 4  # disjoint pairs of the accepted samples
