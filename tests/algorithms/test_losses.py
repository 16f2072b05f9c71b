import math

import pytest
import torch

from thinkrl.algorithms import LOSS_AGGREGATIONS, POLICY_LOSSES, LossParams, aggregate
from thinkrl.config import ConfigError

ppo_clip = POLICY_LOSSES.get("ppo_clip")


def run_ppo(ratios, advs, mask=None, clip_low=0.2, clip_high=0.2):
    """ppo_clip on one row of tokens with old_logp = 0, so ratio = exp(logp); returns loss, d loss/d logp."""
    logp = torch.tensor([[math.log(r) for r in ratios]], requires_grad=True)  # [1, T]
    old = torch.zeros_like(logp)
    adv = torch.tensor([advs])
    mask = torch.ones_like(adv) if mask is None else torch.tensor([mask], dtype=torch.float32)
    loss, metrics = ppo_clip(logp, old, adv, mask, LossParams(clip_low=clip_low, clip_high=clip_high))
    loss.sum().backward()
    return loss.detach()[0], logp.grad[0], metrics


def test_ppo_clip_values_and_gradients_hand_worked():
    # eps = 0.2: the clip range is [0.8, 1.2]. loss = -min(r A, clip(r) A); where the unclipped
    # branch is taken, d loss / d logp = -r A (d r / d logp = r); where clipped, the gradient is 0.
    ratios = [1.5, 0.5, 0.5, 1.5, 1.1, 1.0]
    advs = [1.0, 1.0, -1.0, -1.0, 2.0, -0.5]
    loss, grad, _ = run_ppo(ratios, advs)
    expected_loss = [
        -1.2,  # r=1.5, A=+1: min(1.5, 1.2) = 1.2   (clipped in the direction of A)
        -0.5,  # r=0.5, A=+1: min(0.5, 0.8) = 0.5   (unclipped)
        0.8,  # r=0.5, A=-1: min(-0.5, -0.8) = -0.8 (clipped in the direction of A)
        1.5,  # r=1.5, A=-1: min(-1.5, -1.2) = -1.5 (unclipped)
        -2.2,  # r=1.1, A=2: inside the range, 2.2
        0.5,  # r=1.0, A=-0.5: inside the range, -0.5
    ]
    expected_grad = [0.0, -0.5, 0.0, 1.5, -2.2, 0.5]  # -r A where unclipped
    torch.testing.assert_close(loss, torch.tensor(expected_loss), atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, torch.tensor(expected_grad), atol=1e-6, rtol=0)
    assert grad[0] == 0 and grad[2] == 0  # exactly zero, not just small
    assert torch.all(grad[[1, 3, 4, 5]] != 0)


def test_ppo_clip_metrics():
    ratios = [1.5, 0.5, 0.5, 1.5, 1.1, 1.0]
    advs = [1.0, 1.0, -1.0, -1.0, 2.0, -0.5]
    _, _, m = run_ppo(ratios, advs, mask=[1, 1, 1, 1, 1, 0])
    # clipped tokens: 0 and 2 of the 5 unmasked ones -> 0.4; ratio mean (1.5+.5+.5+1.5+1.1)/5 = 1.02
    assert m["clip_frac"] == pytest.approx(0.4, abs=1e-6)
    assert m["ratio_mean"] == pytest.approx(1.02, abs=1e-6)
    _, _, m = run_ppo(ratios, advs)
    assert m["clip_frac"] == pytest.approx(2 / 6, abs=1e-6)


def test_ppo_clip_higher_uses_separate_bounds():
    # DAPO clip-higher: eps_low = 0.2, eps_high = 0.28 -> range [0.8, 1.28]
    ratios = [1.25, 1.3, 0.75, 0.85]
    advs = [1.0, 1.0, -1.0, -1.0]
    loss, grad, m = run_ppo(ratios, advs, clip_low=0.2, clip_high=0.28)
    # r=1.25, A=+1: under 1.28 -> unclipped: loss -1.25, grad -1.25
    # r=1.3,  A=+1: clipped at 1.28: loss -1.28, grad 0
    # r=0.75, A=-1: clipped at 0.8: min(-0.75, -0.8) = -0.8 -> loss 0.8, grad 0
    # r=0.85, A=-1: inside: loss 0.85, grad -r A = 0.85
    torch.testing.assert_close(loss, torch.tensor([-1.25, -1.28, 0.8, 0.85]), atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, torch.tensor([-1.25, 0.0, 0.0, 0.85]), atol=1e-6, rtol=0)
    assert m["clip_frac"] == pytest.approx(0.5, abs=1e-6)
    # the same first token with the symmetric range [0.8, 1.2] is clipped: loss -1.2, grad 0
    loss, grad, _ = run_ppo([1.25], [1.0])
    assert float(loss[0]) == pytest.approx(-1.2, abs=1e-6) and float(grad[0]) == 0.0


def test_ppo_clip_on_policy_gradient_is_minus_advantage():
    # With old_logp = logp.detach() (one pass per batch), ratio = 1 and d loss/d logp = -A.
    g = torch.Generator().manual_seed(1)
    logp = (-torch.rand(3, 5, generator=g) * 4).requires_grad_()
    adv = torch.randn(3, 5, generator=g)
    loss, m = ppo_clip(logp, logp.detach(), adv, torch.ones(3, 5))
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, -adv, atol=1e-6, rtol=0)
    assert m["clip_frac"] == 0.0 and m["ratio_mean"] == pytest.approx(1.0, abs=1e-6)


# x = [[1, 2, 3], [4, 5, 6]] with mask [[1, 1, 0], [1, 0, 0]]: the real tokens are 1, 2 | 4
X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "mode,norm,expected",
    [
        ("token_mean", 1.0, 7 / 3),  # (1 + 2 + 4) / 3 tokens
        ("seq_mean_token_mean", 1.0, 2.75),  # ((1 + 2) / 2 + 4 / 1) / 2 = (1.5 + 4) / 2
        ("seq_mean_token_sum", 1.0, 3.5),  # ((1 + 2) + 4) / 2
        ("seq_mean_token_sum_norm", 3.0, 3.5 / 3),  # ((1 + 2) + 4) / 2 / 3
    ],
)
def test_aggregate_hand_worked(mode, norm, expected):
    assert float(aggregate(X, M, mode, norm=norm)) == pytest.approx(expected, abs=1e-6)
    # values on padding never count
    padded = torch.where(M.bool(), X, torch.full_like(X, 1e6))
    assert float(aggregate(padded, M, mode, norm=norm)) == pytest.approx(expected, abs=1e-6)


def test_all_aggregations_are_covered():
    assert set(LOSS_AGGREGATIONS.names()) == {
        "token_mean",
        "seq_mean_token_mean",
        "seq_mean_token_sum",
        "seq_mean_token_sum_norm",
    }


def test_aggregate_unknown_mode_lists_choices():
    with pytest.raises(ConfigError, match="choose from: seq_mean_token_mean"):
        aggregate(X, M, "nope")


def run_loss(name, ratios, advs, hp=LossParams(), mask=None):
    """Any policy loss on rows of tokens with old_logp = 0 (ratio = exp(logp)); returns loss, d sum(loss)/d logp."""
    logp = torch.tensor([[math.log(r) for r in row] for row in ratios], requires_grad=True)  # [B, T]
    adv = torch.tensor(advs)
    mask = torch.ones_like(adv) if mask is None else torch.tensor(mask, dtype=torch.float32)
    loss, metrics = POLICY_LOSSES.get(name)(logp, torch.zeros_like(logp), adv, mask, hp)
    (loss * mask).sum().backward()
    return loss.detach(), logp.grad, metrics


def test_dual_clip_hand_worked():
    # eps 0.2, c = 3. For A < 0 the objective is max(min(rA, clip(r)A), 3A).
    ratios = [[5.0, 2.0, 0.5, 1.5, 5.0]]
    advs = [[-1.0, -1.0, -1.0, 1.0, 2.0]]
    loss, grad, m = run_loss("dual_clip", ratios, advs, LossParams(clip_c=3.0))
    expected_loss = [
        [
            3.0,  # r=5, A=-1: PPO min(-5, -1.2) = -5, dual max(-5, -3) = -3 -> loss 3 (the dual bound)
            2.0,  # r=2, A=-1: min(-2, -1.2) = -2 > -3 -> unchanged, loss 2
            0.8,  # r=0.5, A=-1: min(-0.5, -0.8) = -0.8 (PPO clip) -> loss 0.8
            -1.2,  # r=1.5, A=+1: PPO clip at 1.2; the dual clip never touches A > 0
            -2.4,  # r=5, A=+2: min(10, 2.4) = 2.4
        ]
    ]
    expected_grad = [[0.0, 2.0, 0.0, 0.0, 0.0]]  # -rA on the only unclipped token
    torch.testing.assert_close(loss, torch.tensor(expected_loss), atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, torch.tensor(expected_grad), atol=1e-6, rtol=0)
    assert m["dual_clip_frac"] == pytest.approx(1 / 5, abs=1e-6)
    assert m["clip_frac"] == pytest.approx(3 / 5, abs=1e-6)  # tokens 3, 4, 5 take PPO's clipped branch


def test_dual_clip_bound_holds_and_matches_ppo_elsewhere():
    g = torch.Generator().manual_seed(2)
    logp = torch.randn(6, 50, generator=g) * 2  # ratios from e^-6 to e^6
    adv = torch.randn(6, 50, generator=g)
    mask = torch.ones(6, 50)
    hp = LossParams(clip_c=3.0)
    dual, _ = POLICY_LOSSES.get("dual_clip")(logp, torch.zeros_like(logp), adv, mask, hp)
    ppo, _ = ppo_clip(logp, torch.zeros_like(logp), adv, mask, hp)
    neg = adv < 0
    assert torch.all(dual[neg] <= -3.0 * adv[neg] + 1e-6)  # the loss of a negative-advantage token <= c |A|
    assert torch.any(ppo[neg] > -3.0 * adv[neg] + 1e-3)  # ... which PPO alone would exceed on this data
    assert torch.equal(dual[~neg], ppo[~neg])
    assert torch.all(dual <= ppo)


def test_pg_hand_worked():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    adv = torch.tensor([[0.5, -1.0]])
    loss, m = POLICY_LOSSES.get("pg")(logp, logp.detach() - 0.3, adv, torch.ones(1, 2), LossParams())
    # -A logp: -0.5 * -1 = 0.5, 1 * -2 = -2; gradient -A, whatever old_logp is
    torch.testing.assert_close(loss.detach(), torch.tensor([[0.5, -2.0]]), atol=1e-6, rtol=0)
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5, 1.0]]), atol=1e-6, rtol=0)
    assert m["clip_frac"] == 0.0


def test_gspo_hand_worked():
    e = math.exp
    ratios = [[e(0.1), e(0.3)], [e(-0.1), 1.0], [e(0.05), e(-0.05)]]
    advs = [[1.0, 1.0], [-1.0, -1.0], [2.0, 2.0]]
    mask = [[1, 1], [1, 0], [1, 1]]
    loss, grad, m = run_loss("gspo", ratios, advs, mask=mask)
    # row 0: s = exp(mean(0.1, 0.3)) = e^0.2 = 1.2214 > 1.2 with A > 0 -> clipped: loss -1.2 per token, grad 0
    # row 1: one real token, s = e^-0.1 = 0.904837 inside [0.8, 1.2]: loss -sA = 0.904837, grad -A s = 0.904837
    # row 2: s = exp(0) = 1: loss -2 per token, d/d logp_t of -s_t A = -A s = -2 per token
    s1 = e(-0.1)
    torch.testing.assert_close(
        loss * torch.tensor(mask), torch.tensor([[-1.2, -1.2], [s1, 0.0], [-2.0, -2.0]]), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0], [s1, 0.0], [-2.0, -2.0]]), atol=1e-6, rtol=0)
    assert m["clip_frac"] == pytest.approx(2 / 5, abs=1e-6)  # the two tokens of row 0 of 5 real tokens
    assert m["ratio_mean"] == pytest.approx((e(0.2) + s1 + 1.0) / 3, abs=1e-6)


def test_gspo_with_seq_mean_token_mean_is_the_sequence_objective():
    # GSPO (Zheng et al. 2025, eq. 5): J = 1/G sum_i min(s_i A_i, clip(s_i) A_i), s_i = exp(mean_t log ratio)
    g = torch.Generator().manual_seed(4)
    mask = (torch.arange(6)[None] < torch.tensor([6, 2, 4, 5])[:, None]).float()
    old = -torch.rand(4, 6, generator=g) * 3
    logp = (old + torch.randn(4, 6, generator=g) * 0.2).requires_grad_()
    a = torch.tensor([1.0, -0.5, 2.0, -1.0])
    hp = LossParams(clip_low=0.05, clip_high=0.08)
    tok, _ = POLICY_LOSSES.get("gspo")(logp, old, a[:, None] * mask, mask, hp)
    aggregate(tok, mask, "seq_mean_token_mean").backward()
    ours = logp.grad.clone()
    logp.grad = None
    s = torch.exp(((logp - old) * mask).sum(-1) / mask.sum(-1))  # [4]
    (-torch.minimum(s * a, s.clamp(0.95, 1.08) * a).mean()).backward()
    torch.testing.assert_close(ours, logp.grad, atol=1e-6, rtol=0)
    assert float(ours.abs().sum()) > 0


def test_kimi_hand_worked():
    # tau = 0.5, L_i = (a_i - tau * sum_t log ratio)^2 / (2 tau)
    e = math.exp
    loss, grad, _ = run_loss(
        "kimi",
        [[e(0.2), e(0.4)], [1.0, 1.0]],
        [[0.5, 0.5], [-0.5, -0.5]],
        LossParams(tau=0.5),
        mask=[[1, 1], [1, 0]],
    )
    # row 0: log ratio 0.6, L = (0.5 - 0.3)^2 / 1 = 0.04 on each token; dL/dlogp_t = -(a - tau rho) = -0.2
    # row 1: log ratio 0, L = 0.25; dL/dlogp_0 = 0.5. run_loss sums token losses, so row 0's gradient
    # counts twice (two tokens carry L_0): -0.4 per token
    torch.testing.assert_close(loss, torch.tensor([[0.04, 0.04], [0.25, 0.0]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, torch.tensor([[-0.4, -0.4], [0.5, 0.0]]), atol=1e-6, rtol=0)


def test_kimi_aggregated_gradient_is_the_papers_surrogate_gradient():
    # On seq_mean_token_mean: grad = -1/k sum_i [(r_i - mean r) grad log pi(y_i) - tau/2 grad (log ratio_i)^2]
    g = torch.Generator().manual_seed(6)
    mask = (torch.arange(5)[None] < torch.tensor([5, 3, 1, 4])[:, None]).float()
    old = -torch.rand(4, 5, generator=g) * 3
    logp = (old + torch.randn(4, 5, generator=g) * 0.1).requires_grad_()
    a = torch.tensor([0.5, -0.25, 0.75, -1.0])
    tau = 0.3
    tok, _ = POLICY_LOSSES.get("kimi")(logp, old, a[:, None] * mask, mask, LossParams(tau=tau))
    aggregate(tok, mask, "seq_mean_token_mean").backward()
    rho = ((logp.detach() - old) * mask).sum(-1)  # [4]
    # d/d logp_t of -(a log pi - tau/2 rho^2) is -(a - tau rho) on every real token; mean over the 4 sequences
    expected = -(a - tau * rho)[:, None] * mask / 4
    torch.testing.assert_close(logp.grad, expected, atol=1e-6, rtol=0)


def test_value_loss_hand_worked():
    from thinkrl.algorithms import value_loss

    v = torch.tensor([[1.0, 1.0, 0.55]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.5]])
    ret = torch.tensor([[0.6, 1.2, 1.0]])
    loss, m = value_loss(v, old, ret, torch.ones(1, 3), clip=0.2)
    # token 0: (1 - 0.6)^2 = 0.16; V_clip = 0.5 + 0.2 = 0.7: (0.1)^2 = 0.01; 0.5 * max = 0.08, grad V - R = 0.4
    # token 1: (1 - 1.2)^2 = 0.04; V_clip = 0.7: (0.5)^2 = 0.25 wins; 0.125, grad 0 (V_clip is constant)
    # token 2: inside the clip range: 0.5 * 0.45^2 = 0.10125, grad V - R = -0.45
    torch.testing.assert_close(loss.detach(), torch.tensor([[0.08, 0.125, 0.10125]]), atol=1e-6, rtol=0)
    loss.sum().backward()
    torch.testing.assert_close(v.grad, torch.tensor([[0.4, 0.0, -0.45]]), atol=1e-6, rtol=0)
    assert m["vf_clip_frac"] == pytest.approx(1 / 3, abs=1e-6)
    plain, _ = value_loss(v.detach(), old, ret, torch.ones(1, 3), clip=None)
    torch.testing.assert_close(plain, torch.tensor([[0.08, 0.02, 0.10125]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["ppo_clip", "dual_clip", "pg", "gspo"])
def test_advantage_weighted_losses_vanish_with_zero_advantage(name):
    from thinkrl.algorithms import POLICY_LOSSES, advantage_weighted

    assert advantage_weighted(name)
    assert POLICY_LOSSES.names(advantage_weighted=True) == [
        "dual_clip",
        "gspo",
        "pg",
        "ppo_clip",
    ]  # kimi is not
    loss, grad, _ = run_loss(name, [[1.3, 0.7, 1.0]], [[0.0, 0.0, 0.0]])
    assert torch.equal(loss.abs(), torch.zeros(1, 3)) and torch.equal(grad.abs(), torch.zeros(1, 3))


def test_all_policy_losses_are_covered():
    assert set(POLICY_LOSSES.names()) == {"ppo_clip", "dual_clip", "pg", "gspo", "kimi"}


def test_default_aggregation_and_kl_placement():
    from thinkrl.algorithms import kl_in_for, loss_agg_for

    assert loss_agg_for("dr_grpo", "ppo_clip") == "seq_mean_token_sum_norm"  # the estimator's paper
    assert loss_agg_for("dr_grpo", "kimi") == "seq_mean_token_mean"  # a sequence-level loss wins
    assert loss_agg_for("grpo", "gspo", "token_mean") == "token_mean"  # the config wins over both
    assert [kl_in_for(a) for a in ("grpo", "rloo", "gae", "reinforce_pp")] == [
        "loss",
        "loss",
        "reward",
        "reward",
    ]
    assert kl_in_for("gae", "loss") == "loss"
