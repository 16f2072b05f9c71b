import math

import pytest
import torch

from thinkrl.algorithms import ADVANTAGES, LOSS_AGGREGATIONS, AdvantageInput, MovingAverage, group_stats
from thinkrl.algorithms.advantages import discounted_returns, gae_advantages, masked_whiten, token_rewards

# Two groups of four: [1, 0, 0, 1] and [1, 1, 1, 0]. Rows have different lengths, T = 3.
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0])
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
MASK = torch.tensor(
    [[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]],
    dtype=torch.float32,
)
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
    expected = torch.tensor(
        [0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0, 0.25 / s1, 0.25 / s1, 0.25 / s1, -0.75 / s1]
    )
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


def test_every_estimator_declares_a_registered_aggregation_and_a_kl_place():
    for name in ADVANTAGES.names():
        assert ADVANTAGES.trait(name, "loss_agg") in LOSS_AGGREGATIONS
        assert ADVANTAGES.trait(name, "kl_in") in ("loss", "reward")
    # the papers' choices, read off the registrations
    assert ADVANTAGES.names(kl_in="loss") == ["dr_grpo", "grpo", "rloo"]
    assert ADVANTAGES.trait("dr_grpo", "loss_agg") == "seq_mean_token_sum_norm"
    assert [n for n in ADVANTAGES.names() if "values" in ADVANTAGES.trait(n, "needs", ())] == ["gae"]


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo"])
@pytest.mark.parametrize("value", [0.1, 1.1, 0.3])
def test_equal_non_dyadic_rewards_give_exactly_zero(name, value):
    """0.1 is not exact in binary; a float32 group mean of eight 0.1s used to differ from 0.1 by an ulp,
    and GRPO's division by a tiny std blew that up to ~1e-4. The advantage must be exactly 0."""
    rewards = torch.full((8,), value)
    out = ADVANTAGES.get(name)(AdvantageInput(rewards, torch.zeros(8, dtype=torch.long), torch.ones(8, 3)))
    assert torch.equal(out.adv, torch.zeros(8, 3))


# ---------------------------------------------------------------------------
# Token rewards, return-to-go, GAE, whitening: two rows, T = 3, the second row has 2 tokens.

OUTCOME = torch.tensor([1.0, -2.0])
M2 = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
KL2 = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
# beta = 0.5: every token -0.5 * kl, the outcome on the last real token
R_TOK = torch.tensor([[-0.05, -0.1, -0.15 + 1.0], [-0.2, -0.25 - 2.0, 0.0]])
V2 = torch.tensor([[0.5, 0.4, 0.2], [0.3, -1.0, 9.9]])  # 9.9 sits on padding and must be ignored


def test_token_rewards_hand_worked():
    torch.testing.assert_close(token_rewards(OUTCOME, M2, KL2, 0.5), R_TOK, atol=1e-6, rtol=0)
    # without KL only the last real token carries the outcome
    torch.testing.assert_close(
        token_rewards(OUTCOME, M2), torch.tensor([[0.0, 0.0, 1.0], [0.0, -2.0, 0.0]]), atol=0, rtol=0
    )


def test_discounted_returns_hand_worked():
    # gamma = 0.5, R_t = r_t + 0.5 R_{t+1}
    # row 0: R_2 = 0.85; R_1 = -0.1 + 0.425 = 0.325; R_0 = -0.05 + 0.1625 = 0.1125
    # row 1: R_1 = -2.25; R_0 = -0.2 - 1.125 = -1.325; padding 0
    expected = torch.tensor([[0.1125, 0.325, 0.85], [-1.325, -2.25, 0.0]])
    torch.testing.assert_close(discounted_returns(R_TOK, M2, 0.5), expected, atol=1e-6, rtol=0)


# TD errors with gamma = 0.5 and V = 0 after the last real token:
# row 0: d_2 = 0.85 - 0.2 = 0.65; d_1 = -0.1 + 0.5 * 0.2 - 0.4 = -0.4; d_0 = -0.05 + 0.5 * 0.4 - 0.5 = -0.35
# row 1: d_1 = -2.25 + 1.0 = -1.25; d_0 = -0.2 + 0.5 * (-1.0) - 0.3 = -1.0
TD = torch.tensor([[-0.35, -0.4, 0.65], [-1.0, -1.25, 0.0]])


def test_gae_hand_worked():
    # lambda = 0.5: A_t = d_t + 0.25 A_{t+1}
    # row 0: A_2 = 0.65; A_1 = -0.4 + 0.1625 = -0.2375; A_0 = -0.35 - 0.059375 = -0.409375
    # row 1: A_1 = -1.25; A_0 = -1.0 - 0.3125 = -1.3125; returns = A + V on real tokens
    adv, ret = gae_advantages(R_TOK, V2, M2, gamma=0.5, lam=0.5)
    torch.testing.assert_close(
        adv, torch.tensor([[-0.409375, -0.2375, 0.65], [-1.3125, -1.25, 0.0]]), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        ret, torch.tensor([[0.090625, 0.1625, 0.85], [-1.0125, -2.25, 0.0]]), atol=1e-6, rtol=0
    )


def test_gae_lambda_zero_is_the_td_error_and_lambda_one_is_return_minus_value():
    adv0, _ = gae_advantages(R_TOK, V2, M2, gamma=0.5, lam=0.0)
    torch.testing.assert_close(adv0, TD, atol=1e-6, rtol=0)
    adv1, ret1 = gae_advantages(R_TOK, V2, M2, gamma=0.5, lam=1.0)
    rtg = discounted_returns(R_TOK, M2, 0.5)
    torch.testing.assert_close(adv1, (rtg - V2) * M2, atol=1e-6, rtol=0)
    torch.testing.assert_close(ret1, rtg, atol=1e-6, rtol=0)  # with lambda = 1 the critic's target is R_t
    # the same on random data with uneven lengths
    g = torch.Generator().manual_seed(3)
    r, v = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    mask = (torch.arange(7)[None] < torch.tensor([7, 1, 4, 6, 2])[:, None]).float()
    r = r * mask
    adv1, _ = gae_advantages(r, v, mask, gamma=0.9, lam=1.0)
    torch.testing.assert_close(adv1, (discounted_returns(r, mask, 0.9) - v) * mask, atol=1e-5, rtol=0)
    adv0, _ = gae_advantages(r, v, mask, gamma=0.9, lam=0.0)
    v_next = torch.cat([v[:, 1:] * mask[:, 1:], torch.zeros(5, 1)], 1)  # V(s_{t+1}), 0 past the end
    torch.testing.assert_close(adv0, (r + 0.9 * v_next - v) * mask, atol=1e-6, rtol=0)


def test_masked_whiten_hand_worked():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])  # the 100 is padding
    # real values 1..5: mean 3, unbiased var (4 + 1 + 0 + 1 + 4) / 4 = 2.5
    s = math.sqrt(2.5) + EPS
    expected = torch.tensor([[-2 / s, -1 / s, 0.0], [1 / s, 2 / s, 0.0]])
    torch.testing.assert_close(masked_whiten(x, M2, EPS), expected, atol=1e-6, rtol=0)


def test_reinforce_hand_worked_with_baseline():
    rewards, ids, mask = torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), M2
    out = ADVANTAGES.get("reinforce")(AdvantageInput(rewards, ids, mask, gamma=0.5, baseline=0.25))
    # return-to-go of the outcome on the last token, gamma = 0.5: row 0 [0.25, 0.5, 1], row 1 [0, 0, pad]
    # minus the baseline 0.25 on real tokens
    torch.testing.assert_close(
        out.returns, torch.tensor([[0.25, 0.5, 1.0], [0.0, 0.0, 0.0]]), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        out.adv, torch.tensor([[0.0, 0.25, 0.75], [-0.25, -0.25, 0.0]]), atol=1e-6, rtol=0
    )


def test_reinforce_pp_hand_worked():
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    out = ADVANTAGES.get("reinforce_pp")(
        AdvantageInput(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), mask, eps=EPS)
    )
    # returns (gamma 1): [1, 1] and [0, pad]; real values 1, 1, 0: mean 2/3,
    # unbiased var ((1/3)^2 * 2 + (2/3)^2) / 2 = 1/3, std 0.5773503
    s = math.sqrt(1 / 3) + EPS
    torch.testing.assert_close(
        out.adv, torch.tensor([[1 / 3 / s, 1 / 3 / s], [-2 / 3 / s, 0.0]]), atol=1e-6, rtol=0
    )


def test_reinforce_pp_puts_kl_in_the_token_rewards():
    out = ADVANTAGES.get("reinforce_pp")(
        AdvantageInput(OUTCOME, torch.tensor([0, 0]), M2, token_kl=KL2, kl_coef=0.5, gamma=0.5, eps=EPS)
    )
    rtg = torch.tensor([[0.1125, 0.325, 0.85], [-1.325, -2.25, 0.0]])  # test_discounted_returns_hand_worked
    torch.testing.assert_close(out.returns, rtg, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.adv, masked_whiten(rtg, M2, EPS), atol=1e-6, rtol=0)


def test_reinforce_pp_baseline_hand_worked():
    rewards, ids = torch.tensor([1.0, 0.0, 0.5, 0.5]), torch.tensor([0, 0, 1, 1])
    out = ADVANTAGES.get("reinforce_pp_baseline")(AdvantageInput(rewards, ids, torch.ones(4, 2), eps=EPS))
    # minus the group mean: 0.5, -0.5, 0, 0; returns (gamma 1) fill each row: 8 values with mean 0,
    # unbiased var 4 * 0.25 / 7 = 1/7; the equal-reward group stays exactly 0
    s = math.sqrt(1 / 7) + EPS
    expected = torch.tensor([[0.5 / s] * 2, [-0.5 / s] * 2, [0.0] * 2, [0.0] * 2])
    torch.testing.assert_close(out.adv, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["reinforce_pp_baseline"])
def test_equal_rewards_give_zero_advantage_with_group_baseline(name):
    out = ADVANTAGES.get(name)(
        AdvantageInput(torch.tensor([0.7, 0.7, 1.0, 1.0]), torch.tensor([0, 0, 1, 1]), torch.ones(4, 3))
    )
    assert torch.equal(out.adv, torch.zeros(4, 3))


def test_gae_estimator_whitens_the_gae_advantages():
    b = AdvantageInput(
        OUTCOME, torch.tensor([0, 0]), M2, token_kl=KL2, kl_coef=0.5, values=V2, gamma=0.5, lam=0.5, eps=EPS
    )
    out = ADVANTAGES.get("gae")(b)
    raw, ret = gae_advantages(R_TOK, V2, M2, 0.5, 0.5)  # hand-worked in test_gae_hand_worked
    torch.testing.assert_close(out.adv, masked_whiten(raw, M2, EPS), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.returns, ret, atol=1e-6, rtol=0)
    assert abs(float(out.adv.sum())) < 1e-5  # whitened: mean 0 over the real tokens
    with pytest.raises(ValueError, match="critic"):
        ADVANTAGES.get("gae")(AdvantageInput(OUTCOME, torch.tensor([0, 0]), M2))


def test_moving_average_baseline_is_bias_corrected():
    b = MovingAverage(0.5)
    assert b.value == 0.0  # no history yet
    b.update(1.0)  # ema 0.5 after one update; corrected by 1 - 0.5 = 0.5 -> 1.0
    assert b.value == pytest.approx(1.0, abs=1e-12)
    b.update(0.0)  # ema 0.25; corrected by 1 - 0.25 -> 1/3 (weights 0.25 and 0.5 on 1 and 0)
    assert b.value == pytest.approx(1 / 3, abs=1e-12)
    c = MovingAverage(0.5)
    c.load_state_dict(b.state_dict())
    assert c.value == b.value


def test_every_estimator_returns_zero_on_padding():
    g = torch.Generator().manual_seed(5)
    rewards, ids = torch.rand(8, generator=g), GROUPS
    b = AdvantageInput(
        rewards,
        ids,
        MASK,
        token_kl=torch.rand(8, 3, generator=g),
        kl_coef=0.1,
        values=torch.randn(8, 3, generator=g),
        gamma=0.9,
        lam=0.8,
    )
    for name in ADVANTAGES.names():
        out = ADVANTAGES.get(name)(b)
        assert out.adv.shape == (8, 3) and torch.all(out.adv[MASK == 0] == 0), name
        assert out.returns is None or torch.all(out.returns[MASK == 0] == 0), name
