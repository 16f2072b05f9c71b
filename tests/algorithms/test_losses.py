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
        0.8,   # r=0.5, A=-1: min(-0.5, -0.8) = -0.8 (clipped in the direction of A)
        1.5,   # r=1.5, A=-1: min(-1.5, -1.2) = -1.5 (unclipped)
        -2.2,  # r=1.1, A=2: inside the range, 2.2
        0.5,   # r=1.0, A=-0.5: inside the range, -0.5
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


@pytest.mark.parametrize("mode,norm,expected", [
    ("token_mean", 1.0, 7 / 3),  # (1 + 2 + 4) / 3 tokens
    ("seq_mean_token_mean", 1.0, 2.75),  # ((1 + 2) / 2 + 4 / 1) / 2 = (1.5 + 4) / 2
    ("seq_mean_token_sum", 1.0, 3.5),  # ((1 + 2) + 4) / 2
    ("seq_mean_token_sum_norm", 3.0, 3.5 / 3),  # ((1 + 2) + 4) / 2 / 3
])
def test_aggregate_hand_worked(mode, norm, expected):
    assert float(aggregate(X, M, mode, norm=norm)) == pytest.approx(expected, abs=1e-6)
    # values on padding never count
    padded = torch.where(M.bool(), X, torch.full_like(X, 1e6))
    assert float(aggregate(padded, M, mode, norm=norm)) == pytest.approx(expected, abs=1e-6)


def test_all_aggregations_are_covered():
    assert set(LOSS_AGGREGATIONS.names()) == {"token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                                              "seq_mean_token_sum_norm"}


def test_aggregate_unknown_mode_lists_choices():
    with pytest.raises(ConfigError, match="choose from: seq_mean_token_mean"):
        aggregate(X, M, "nope")
