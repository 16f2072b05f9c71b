"""policy_objective on a hand-worked batch: 2 sequences x 3 tokens, the second one 2 tokens long."""

import math

import pytest
import torch

from thinkrl.algorithms import (
    KL_ESTIMATORS,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    Objective,
    aggregation_share,
    policy_objective,
)

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # 5 real tokens; [1, 2] is padding
ADV = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]])  # one advantage per sequence
LOGP = [[-1.0, -2.0, -1.0], [-0.5, -1.0, -3.0]]
# k1 = logp - ref_logp: [[0.5, 0, 0], [0, 1, 1]]; the 1 at the padding must not count
REF = torch.tensor([[-1.5, -2.0, -1.0], [-0.5, -2.0, -4.0]])
BETA = 0.1


def objective(agg: str, **kw) -> Objective:
    return Objective(
        loss=POLICY_LOSSES.get("ppo_clip"), agg=agg, norm=4.0, kl=KL_ESTIMATORS.get("k1"), kl_coef=BETA, **kw
    )


def run(agg: str, rows=(0, 1), step_rows=2.0, step_tokens=5.0, **kw):
    """The objective of ``rows`` with pi_old = pi (first pass: ratio 1, so PPO's token loss is -A)."""
    logp = torch.tensor(LOGP)[list(rows)].requires_grad_(True)  # [b, 3]
    r = list(rows)
    loss, metrics = policy_objective(
        logp,
        logp.detach(),
        ADV[r],
        MASK[r],
        objective(agg, **kw.pop("obj", {})),
        step_rows=step_rows,
        step_tokens=step_tokens,
        ref_logp=REF[r],
        **kw,
    )
    loss.backward()
    return loss, metrics, logp.grad


# Token losses l = -A + 0.1 * k1, on the real tokens:
#   row 0: [-1 + 0.05, -1, -1]  -> sum -2.95 over 3 tokens
#   row 1: [ 2,        2 + 0.1] -> sum  4.10 over 2 tokens
@pytest.mark.parametrize(
    "agg, expected",
    [
        ("token_mean", (-2.95 + 4.1) / 5),  # 0.23: every token alike
        ("seq_mean_token_mean", (-2.95 / 3 + 4.1 / 2) / 2),  # 0.5333...: every sequence alike
        ("seq_mean_token_sum_norm", (-2.95 + 4.1) / 2 / 4),  # 0.14375: Dr. GRPO, the constant 4
    ],
    ids=["token_mean", "seq_mean", "dr_grpo"],
)
def test_the_three_normalisations_of_one_batch(agg, expected):
    loss, metrics, _ = run(agg)
    assert math.isclose(float(loss.detach()), expected, abs_tol=1e-6)
    assert math.isclose(metrics["loss"], expected, abs_tol=1e-6)
    assert metrics["tokens"] == 5.0
    assert math.isclose(metrics["kl_sum"], 0.5 + 1.0, abs_tol=1e-6)  # not the padding's 1
    assert metrics["clip_frac"] == 0.0 and metrics["ratio_mean"] == 1.0  # the loss's own metrics


def test_token_mean_gradient():
    # d l_t / d logp_t = -A_t (ratio 1, unclipped) + 0.1 (d k1 / d logp = 1), divided by the 5 tokens
    _, _, grad = run("token_mean")
    expected = torch.tensor([[-0.9 / 5] * 3, [2.1 / 5, 2.1 / 5, 0.0]])
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batches_sum_to_the_batch(agg):
    """Each row as its own micro-batch, weighted by its share of the step: the same loss and gradient."""
    whole, _, g = run(agg)
    parts = [run(agg, rows=(i,)) for i in (0, 1)]
    assert math.isclose(sum(float(p[0].detach()) for p in parts), float(whole.detach()), abs_tol=1e-6)
    torch.testing.assert_close(torch.cat([p[2] for p in parts]), g, atol=1e-6, rtol=0)
    # token_mean weighs row 0 by 3/5, the sequence means by 1/2
    w0 = 3 / 5 if agg == "token_mean" else 1 / 2
    assert math.isclose(aggregation_share(agg, 1, 3.0, 2, 5.0), w0)


def test_entropy_bonus_and_truncated_importance_weights():
    # TIS: behaviour = pi_old - log 2, so each weight is min(2, 1.5) = 1.5 on the policy term only:
    #   row 0: [-1.5 + 0.05, -1.5, -1.5] = -4.45; row 1: [3, 3 + 0.1] = 6.1
    # entropy 1 on row 0 and 2 on row 1, coefficient 0.5: -0.5 * (3 * 1) - 0.5 * (2 * 2) = -3.5
    ent = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    behaviour = torch.tensor(LOGP) - math.log(2)
    loss, m, _ = run(
        "token_mean", obj={"tis_cap": 1.5, "entropy_coef": 0.5}, entropy=ent, behaviour_logp=behaviour
    )
    assert math.isclose(float(loss.detach()), (-4.45 + 6.1 - 3.5) / 5, abs_tol=1e-6)
    assert math.isclose(m["entropy_sum"], 3 * 1.0 + 2 * 2.0, abs_tol=1e-6)
    assert math.isclose(m["tis_sum"], 5 * 1.5, abs_tol=1e-6)
    assert math.isclose(m["mismatch_sum"], 5 * math.log(2), abs_tol=1e-5)
    assert math.isclose(m["mismatch_max"], math.log(2), abs_tol=1e-6)


def test_which_rows_can_be_skipped():
    ppo = POLICY_LOSSES.get("ppo_clip")
    assert not Objective(loss=ppo, agg="token_mean", advantage_weighted=True).needs_every_row
    assert Objective(loss=ppo, agg="token_mean", advantage_weighted=False).needs_every_row  # kimi
    assert Objective(loss=ppo, agg="token_mean", advantage_weighted=True, entropy_coef=0.1).needs_every_row
    assert Objective(
        loss=ppo, agg="token_mean", advantage_weighted=True, kl=KL_ESTIMATORS.get("k3")
    ).needs_every_row


def test_every_aggregation_declares_its_unit():
    for name in LOSS_AGGREGATIONS.names():
        assert LOSS_AGGREGATIONS.trait(name, "unit") in ("tokens", "sequences"), name
