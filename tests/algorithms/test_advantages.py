import math

import pytest
import torch

from thinkrl.algorithms import ADVANTAGES, DEFAULT_LOSS_AGG, LOSS_AGGREGATIONS, AdvantageInput, group_stats

# Two groups of four: [1, 0, 0, 1] and [1, 1, 1, 0]. Rows have different lengths, T = 3.
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1],
                     [1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.float32)
EPS = 1e-4


def estimate(name, rewards, group_ids, mask, eps=EPS, **kw):
    return ADVANTAGES.get(name)(AdvantageInput(rewards, group_ids, mask, eps=eps, **kw)).adv


def per_seq(adv: torch.Tensor) -> torch.Tensor:
    """The first token carries each sequence's advantage (every row has >= 1 token)."""
    return adv[:, 0]


def test_group_stats_hand_worked():
    mean, std, count = group_stats(REWARDS, GROUPS)
    # group 0: mean 2/4 = 0.5; squared deviations 4 * 0.25 = 1; unbiased var 1/3; std sqrt(1/3)
    # group 1: mean 3/4 = 0.75; squared deviations 3 * 0.0625 + 0.5625 = 0.75; var 0.75/3 = 0.25; std 0.5
    exp_mean = torch.tensor([0.5] * 4 + [0.75] * 4)
    exp_std = torch.tensor([math.sqrt(1 / 3)] * 4 + [0.5] * 4)
    torch.testing.assert_close(mean, exp_mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(std, exp_std, atol=1e-6, rtol=0)
    torch.testing.assert_close(count, torch.full((8,), 4.0), atol=0, rtol=0)


def test_group_stats_matches_torch_std_on_interleaved_groups():
    # Groups are identified by id, not by position: ids interleave and are not 0..n-1.
    values = torch.tensor([3.0, -1.0, 2.0, 5.0, 0.5, 7.0, 1.0])
    ids = torch.tensor([9, 4, 9, 4, 9, 2, 4])
    mean, std, count = group_stats(values, ids)
    for g in (9, 4, 2):
        sel = ids == g
        ref = values[sel]
        assert torch.allclose(mean[sel], ref.mean().expand(int(sel.sum())), atol=1e-6)
        # a one-element group has std 0 (the Bessel denominator is clamped to 1), torch.std gives nan
        ref_std = ref.std() if ref.numel() > 1 else torch.tensor(0.0)
        assert torch.allclose(std[sel], ref_std.expand(int(sel.sum())), atol=1e-6)
        assert torch.all(count[sel] == ref.numel())


def test_grpo_hand_worked():
    adv = estimate("grpo", REWARDS, GROUPS, MASK, eps=EPS)
    assert adv.shape == (8, 3) and adv.dtype == torch.float32
    s0 = math.sqrt(1 / 3) + EPS  # group 0: (r - 0.5) / (sqrt(1/3) + 1e-4) = +-0.86588...
    s1 = 0.5 + EPS  # group 1: (r - 0.75) / 0.5001 = 0.49990 or -1.49970
    expected = torch.tensor([0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0,
                             0.25 / s1, 0.25 / s1, 0.25 / s1, -0.75 / s1])
    torch.testing.assert_close(per_seq(adv), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(adv, expected[:, None] * MASK, atol=1e-6, rtol=0)


def test_dr_grpo_hand_worked_has_no_std_division():
    adv = estimate("dr_grpo", REWARDS, GROUPS, MASK, eps=EPS)
    # r - mean(group): group 0 -> +-0.5; group 1 -> 1 - 0.75 = 0.25, 0 - 0.75 = -0.75
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.25, 0.25, 0.25, -0.75])
    torch.testing.assert_close(adv, expected[:, None] * MASK, atol=1e-6, rtol=0)


def test_rloo_hand_worked():
    adv = estimate("rloo", REWARDS, GROUPS, MASK, eps=EPS)
    # leave-one-out, group 0: r=1 -> 1 - mean(0, 0, 1) = 2/3; r=0 -> 0 - mean(1, 0, 1) = -2/3
    # group 1: r=1 -> 1 - mean(1, 1, 0) = 1/3; r=0 -> 0 - mean(1, 1, 1) = -1
    # and G/(G-1) * (r - mean) = 4/3 * 0.5 = 2/3, 4/3 * 0.25 = 1/3, 4/3 * -0.75 = -1: the same
    expected = torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3, -1.0])
    torch.testing.assert_close(adv, expected[:, None] * MASK, atol=1e-6, rtol=0)


def test_rloo_equals_explicit_leave_one_out_on_uneven_groups():
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(8, generator=g)
    ids = torch.tensor([0, 1, 0, 1, 1, 0, 1, 1])  # sizes 3 and 5
    adv = estimate("rloo", rewards, ids, torch.ones(8, 1))[:, 0]
    for i in range(8):
        others = [rewards[j] for j in range(8) if j != i and ids[j] == ids[i]]
        ref = rewards[i] - sum(others) / len(others)
        assert abs(float(adv[i]) - float(ref)) < 1e-6


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_equal_rewards_give_zero_advantage(name):
    rewards = torch.tensor([0.7, 0.7, 0.7, 1.0, 1.0])
    ids = torch.tensor([0, 0, 0, 1, 1])
    adv = estimate(name, rewards, ids, torch.ones(5, 4), eps=EPS)
    # every reward equals its group mean: r - mean = 0, and 0 / (0 + eps) = 0 for grpo
    assert torch.equal(adv, torch.zeros(5, 4))


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
def test_advantage_is_zero_on_padding(name):
    adv = estimate(name, REWARDS, GROUPS, MASK, eps=EPS)
    assert torch.all(adv[MASK == 0] == 0)
    assert torch.all(adv[MASK == 1] != 0)  # no reward equals its group mean in this batch
    # on real tokens every position of a row carries the same value
    for i in range(8):
        vals = adv[i][MASK[i] == 1]
        assert torch.all(vals == vals[0])


def test_default_loss_aggregation_names_are_registered():
    assert set(DEFAULT_LOSS_AGG) == set(ADVANTAGES.names())
    for agg in DEFAULT_LOSS_AGG.values():
        assert agg in LOSS_AGGREGATIONS
