import math

import pytest
import torch

from egrsd_pl.stats import RunningRewardStats, welford_moments


def update(stats: RunningRewardStats, rewards: list[float]) -> None:
    """One optimizer step of a single process: queue the rewards, then merge them."""
    stats.record(torch.tensor(rewards))
    stats.commit_step()


def test_welford_matches_population_moments():
    stats = RunningRewardStats()
    update(stats, [1.0, 0.0])  # mean 0.5
    update(stats, [1.5, 0.0, 0.5])  # all five: mean 3/5 = 0.6
    # squared deviations from 0.6: 0.16 + 0.36 + 0.81 + 0.36 + 0.01 = 1.70 -> var 0.34
    assert stats.count == 5 and stats.steps == 2
    assert stats.mean == pytest.approx(0.6, abs=1e-12)
    assert stats.std == pytest.approx(math.sqrt(0.34), abs=1e-12)


def test_merge_of_gathered_rank_moments_equals_one_process_update():
    a, b = torch.tensor([1.0, 0.0, 1.25]), torch.tensor([0.0, 1.5])
    merged = RunningRewardStats()
    merged.commit_step(torch.stack([welford_moments(a), welford_moments(b)]))  # what an all-gather gives
    sequential = RunningRewardStats()
    update(sequential, torch.cat([a, b]).tolist())
    # all five: mean 3.75 / 5 = 0.75; squared deviations .0625 + .5625 + .25 + .5625 + .5625 = 2.0 -> var 0.4
    assert merged.count == 5 and merged.steps == sequential.steps == 1
    assert merged.mean == pytest.approx(0.75, abs=1e-12) and sequential.mean == pytest.approx(0.75, abs=1e-12)
    assert merged.std == pytest.approx(math.sqrt(0.4), abs=1e-12)
    assert sequential.std == pytest.approx(math.sqrt(0.4), abs=1e-12)
    assert not merged.pending and not sequential.pending


def test_warmup_baseline_then_running_statistics():
    stats = RunningRewardStats(warmup_steps=2)
    rewards = torch.tensor([1.5, 0.0])
    assert torch.equal(stats.advantages(rewards), torch.tensor([1.0, -0.5]))  # r - 0.5 during warm-up
    update(stats, [1.0, 0.0])
    update(stats, [1.0, 0.0])  # mean 0.5, std 0.5, two steps seen
    # (1.5 - 0.5) / 0.5 = 2 ; (0 - 0.5) / 0.5 = -1
    assert torch.allclose(stats.advantages(rewards), torch.tensor([2.0, -1.0]))


def test_zero_std_falls_back_to_warmup_baseline():
    stats = RunningRewardStats(warmup_steps=0)
    assert torch.equal(stats.advantages(torch.tensor([1.0])), torch.tensor([0.5]))  # no rewards yet
    update(stats, [0.0, 0.0, 0.0])  # sigma = 0
    assert torch.equal(stats.advantages(torch.tensor([1.0, 0.0])), torch.tensor([0.5, -0.5]))


def test_state_dict_round_trip():
    stats = RunningRewardStats()
    update(stats, [0.25, 1.0, 0.0])
    restored = RunningRewardStats()
    restored.load_state_dict(stats.state_dict())
    assert restored.state_dict() == stats.state_dict()
