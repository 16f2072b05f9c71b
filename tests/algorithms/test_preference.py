import math

import pytest
import torch

from thinkrl.algorithms.preference import PREFERENCE_LOSSES, dpo, ln_dpo, simpo


def test_dpo_at_policy_equal_reference_is_log2():
    logp = torch.tensor([-12.5, -3.0, -40.0])
    loss, m = dpo(logp, logp - 7.0, logp, logp - 7.0, torch.ones(3), torch.ones(3), beta=0.1)
    # margin 0 -> -log sigma(0) = log 2
    assert abs(loss.item() - math.log(2)) < 1e-6 and m["reward_margin"] == 0.0


def test_dpo_hand_value():
    # (logp_c - ref_c) - (logp_r - ref_r) = (-1 - -2) - (-3 - -2) = 1 - (-1) = 2; beta 0.5 -> z = 1
    # -log sigma(1) = log(1 + e^-1) = 0.3132617
    loss, _ = dpo(
        torch.tensor([-1.0]),
        torch.tensor([-3.0]),
        torch.tensor([-2.0]),
        torch.tensor([-2.0]),
        torch.tensor([4.0]),
        torch.tensor([8.0]),
        beta=0.5,
    )
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-6)


def test_ln_dpo_divides_log_ratios_by_length():
    # chosen: (-4 - -8)/4 = 1; rejected: (-8 - -4)/8 = -0.5; margin 1.5, beta 2 -> z = 3
    loss, m = ln_dpo(
        torch.tensor([-4.0]),
        torch.tensor([-8.0]),
        torch.tensor([-8.0]),
        torch.tensor([-4.0]),
        torch.tensor([4.0]),
        torch.tensor([8.0]),
        beta=2.0,
    )
    assert m["reward_margin"] == pytest.approx(1.5, abs=1e-6)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-3)), abs=1e-6)


def test_simpo_uses_no_reference():
    # beta/|c| logp_c - beta/|r| logp_r - gamma = 2*(-4/4) - 2*(-12/4) - 1 = -2 + 6 - 1 = 3
    args = (torch.tensor([-4.0]), torch.tensor([-12.0]))
    lens = (torch.tensor([4.0]), torch.tensor([4.0]))
    loss, _ = simpo(*args, None, None, *lens, beta=2.0, gamma=1.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-3)), abs=1e-6)
    assert PREFERENCE_LOSSES.get("simpo").needs_reference is False
    assert PREFERENCE_LOSSES.get("dpo").needs_reference is True
