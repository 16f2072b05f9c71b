"""Numerical guards: a non-finite reward, loss or gradient norm skips the update and leaves the weights."""

import math

import pytest
import torch
from test_rl import MASK, make_parts, rollout, weights

from thinkrl.trainer.common import optimizer_step
from thinkrl.trainer.guards import BadStepGuard, TrainingError, skip_cause
from thinkrl.trainer.rl import policy_update


@pytest.mark.parametrize(
    "loss,norm,cause",
    [
        (0.5, 2.0, None),
        (float("nan"), 2.0, "nan_loss"),
        (float("inf"), float("nan"), "nan_loss"),
        (0.5, float("nan"), "nan_grad_norm"),
        (0.5, float("inf"), "nan_grad_norm"),
        (-3.0, 0.0, None),
    ],
)
def test_skip_cause(loss, norm, cause):
    assert skip_cause(loss, norm) == cause


def test_a_nan_gradient_skips_the_optimizer_and_the_schedule():
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    model = torch.nn.Module()
    model.w = w
    opt = torch.optim.AdamW([w], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    handle = w.register_hook(lambda g: g * float("nan"))  # a finite loss whose gradient is NaN
    gn, cause = optimizer_step(model, opt, sched, (w * w).sum(), max_grad_norm=1.0)
    assert math.isnan(gn) and cause == "nan_grad_norm"
    assert torch.equal(w.detach(), torch.tensor([1.0, 2.0])) and w.grad is None
    assert opt.state_dict()["state"] == {} and sched.last_epoch == 0  # AdamW never stepped, nor the schedule
    handle.remove()
    gn, cause = optimizer_step(model, opt, sched, (w * w).sum(), max_grad_norm=100.0)
    # d/dw sum(w^2) = 2w = (2, 4): norm sqrt(20); AdamW's first step moves each weight by lr against its sign
    assert cause is None and gn == pytest.approx(math.sqrt(20), abs=1e-6)
    assert torch.allclose(w.detach(), torch.tensor([1.0, 2.0]) * (1 - 0.1 * 0.01) - 0.1, atol=1e-5)
    assert sched.last_epoch == 1


def test_policy_update_with_a_nan_advantage_leaves_the_weights(tiny):
    model, tok = tiny
    before = weights(model)
    parts = make_parts(model, tok)
    adv = torch.ones(4, 4)
    adv[1, 0] = float("nan")  # one token's advantage: the whole loss is NaN
    m = policy_update(parts, rollout(), adv, MASK)
    assert m["skip_cause"] == "nan_loss" and math.isnan(m["loss"])
    after = weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert parts.optimizer.state_dict()["state"] == {} and all(p.grad is None for p in model.parameters())
    m = policy_update(parts, rollout(), torch.ones(4, 4), MASK)  # a finite one is applied
    assert "skip_cause" not in m and any(not torch.equal(before[k], v) for k, v in weights(model).items())


def test_bad_step_guard_counts_resets_and_stops():
    g = BadStepGuard(max_bad_steps=2)
    rows = [
        {"step": 1},
        {"step": 2, "skip_cause": "nan_reward"},
        {"step": 3},
        {"step": 4, "skip_cause": "nan_loss"},
    ]
    for m in rows:
        g.record(m["step"], m)
        assert not g.exhausted
    assert [(m["skipped"], m["skipped_total"]) for m in rows] == [(0, 0), (1, 1), (0, 1), (1, 2)]
    resumed = BadStepGuard(max_bad_steps=2)
    resumed.load_state_dict(g.state_dict())  # the streak survives a resume
    m = {"step": 5, "skip_cause": "nan_grad_norm"}
    resumed.record(5, m)
    assert resumed.exhausted and m["skipped_total"] == 3
    err = resumed.error("runs/x/checkpoints/step-3")
    assert isinstance(err, TrainingError)
    assert str(err) == (
        "training stopped after 2 skipped updates in a row (step 4: nan_loss, step 5: nan_grad_norm; "
        "optim.max_bad_steps=2): the loss is not finite: lower optim.lr or check the advantages' "
        "inputs; the gradient norm is not finite: lower optim.lr; the last good checkpoint is "
        "runs/x/checkpoints/step-3"
    )


def test_optimizer_pass_sums_the_parts_and_skips_a_non_finite_one():
    """Two parts of the loss 0.5 * (w0 + w1)^2, each weighted 1/2: the gradient of the whole,
    (w0 + w1) * [1, 1] = [3, 3] at w = [1, 2]; one step of SGD at lr 0.1 moves w to [0.7, 1.7]."""
    from thinkrl.trainer.common import optimizer_pass

    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    calls = []

    def loss_of(part):
        loss = 0.5 * model.w.sum() ** 2 * part  # each part weighs 1/2
        return loss, float(loss.detach())

    total, gn, cause = optimizer_pass(
        model, opt, [0.5, 0.5], loss_of, 1e9, sched=sched, before_step=lambda: calls.append(1)
    )
    assert cause is None and math.isclose(total, 4.5) and math.isclose(gn, math.sqrt(18), rel_tol=1e-6)
    torch.testing.assert_close(model.w.detach(), torch.tensor([0.7, 1.7]), atol=1e-6, rtol=0)
    assert calls == [1] and sched.last_epoch == 1

    before = model.w.detach().clone()
    total, _, cause = optimizer_pass(
        model, opt, [0.5, float("nan")], loss_of, 1e9, sched=sched, before_step=lambda: calls.append(1)
    )
    assert cause == "nan_loss" and math.isnan(total)
    assert (
        torch.equal(model.w.detach(), before) and model.w.grad is None
    )  # nothing applied, gradients dropped
    assert calls == [1] and sched.last_epoch == 1
