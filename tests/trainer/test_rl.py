import copy
import math

import pytest
import torch

from thinkrl.algorithms import ADVANTAGES, POLICY_LOSSES, AdvantageInput, aggregate
from thinkrl.config import Config
from thinkrl.rollout import Rollout
from thinkrl.trainer.batch import make_micro_batch, token_logps
from thinkrl.trainer.rl import Parts, Reference, lr_lambda, policy_update

# Two prompts x two samples; completion lengths 3, 1, 4, 2 (T = 4).
PROMPTS = [[72, 105, 33], [72, 105, 33], [49, 43, 49, 61], [49, 43, 49, 61]]
COMPLETIONS = [[50, 51, 258], [52], [50, 32, 50, 258], [55, 56]]
LENGTHS = torch.tensor([len(c) for c in COMPLETIONS])
MASK = (torch.arange(4)[None, :] < LENGTHS[:, None]).float()  # [4, 4]
GROUPS = torch.tensor([0, 0, 1, 1])


def rollout():
    return Rollout(prompt_ids=PROMPTS, completion_ids=COMPLETIONS, texts=[""] * 4, truncated=[False] * 4)


def make_parts(model, tok, optimizer=None, ref_model=None, **algo):
    cfg = Config()
    cfg.rollout.max_new_tokens = 4
    cfg.rollout.group_size = 2  # PROMPTS come in groups of two
    cfg.rollout.temperature = 1.0  # log-probs of the untempered model, as computed by the references here
    cfg.optim.micro_batch_size = algo.pop("micro_batch_size", 2)
    cfg.optim.max_grad_norm = algo.pop("max_grad_norm", 1.0)
    for k, v in algo.items():
        setattr(cfg.algo, k, v)
    opt = optimizer(model.parameters()) if optimizer else torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    ref = Reference(ref_model) if ref_model is not None else None
    return Parts(cfg, model, ref, tok, None, None, None, opt, sched, False)


def weights(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_policy_update_changes_weights(tiny):
    model, tok = tiny
    before = weights(model)
    adv = ADVANTAGES.get("grpo")(AdvantageInput(torch.tensor([1.0, 0.0, 0.0, 1.0]), GROUPS, MASK)).adv
    m = policy_update(make_parts(model, tok), rollout(), adv, MASK)
    after = weights(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert m["trained_seqs"] == 4 and m["grad_norm"] > 0
    assert m["clip_frac"] == 0.0  # one pass on fresh samples: ratio 1, nothing clipped
    assert math.isfinite(m["loss"]) and m["entropy"] > 0
    assert "kl" not in m


def test_policy_update_with_zero_advantages_and_no_kl_leaves_weights(tiny):
    model, tok = tiny
    before = weights(model)
    m = policy_update(make_parts(model, tok, kl_coef=0.0), rollout(), torch.zeros(4, 4), MASK)
    after = weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert m["trained_seqs"] == 0 and m["grad_norm"] == 0.0 and m["loss"] == 0.0


def test_policy_update_with_kl_trains_every_row(tiny):
    model, tok = tiny
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0])  # group 0 has A = 0
    adv = ADVANTAGES.get("grpo")(AdvantageInput(rewards, GROUPS, MASK)).adv
    m = policy_update(make_parts(model, tok, ref_model=ref, kl_coef=0.1), rollout(), adv, MASK)
    assert m["trained_seqs"] == 4  # the KL term needs the zero-advantage rows too
    assert m["kl"] == 0.0  # policy == reference before the step: d = 0, k3 = e^0 - 0 - 1 = 0 exactly


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("micro_batch_size", [1, 3])
def test_micro_batches_accumulate_the_full_batch_gradient(tiny, agg, micro_batch_size):
    """SGD with lr=1 and no clipping moves the weights by exactly -grad; compare with the gradient of the
    whole batch's loss computed in one pass (including the zero-advantage rows that the update skips)."""
    model, tok = tiny
    reference = copy.deepcopy(model)
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0])  # group 0 is all right: its rows are skipped
    adv = ADVANTAGES.get("grpo")(AdvantageInput(rewards, GROUPS, MASK)).adv  # [4, 4]

    mb = make_micro_batch(PROMPTS, COMPLETIONS, [0, 1, 2, 3], tok.pad_token_id)
    logp, _ = token_logps(reference, mb)
    tok_loss, _ = POLICY_LOSSES.get("ppo_clip")(logp, logp.detach(), adv, MASK)
    aggregate(tok_loss, MASK, agg, norm=4.0).backward()
    expected = {k: p.grad for k, p in reference.named_parameters()}

    before = weights(model)
    parts = make_parts(
        model,
        tok,
        optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0),
        loss_agg=agg,
        micro_batch_size=micro_batch_size,
        max_grad_norm=1e9,
    )
    m = policy_update(parts, rollout(), adv, MASK)
    assert m["trained_seqs"] == 2
    for k, p in model.named_parameters():
        torch.testing.assert_close(before[k] - p.detach(), expected[k], atol=1e-6, rtol=0)
    assert any(expected[k].abs().max() > 1e-3 for k in expected)  # the comparison is not between zeros


def test_lr_schedules_hand_worked():
    cfg = Config()
    cfg.optim.warmup_steps, cfg.optim.min_lr_ratio = 2, 0.1
    cfg.optim.schedule = "linear"
    f = lr_lambda(cfg, total=10)
    # warmup: (i + 1) / 2; then frac = (i - 2) / 8: 1 - 0.9 * frac
    assert [f(0), f(1), f(2), f(6), f(10)] == pytest.approx([0.5, 1.0, 1.0, 0.55, 0.1], abs=1e-12)
    cfg.optim.schedule = "cosine"
    f = lr_lambda(cfg, total=10)
    # 0.1 + 0.9 * (1 + cos(pi * frac)) / 2: frac 0 -> 1, frac 0.5 -> 0.55, frac 1 -> 0.1
    assert [f(2), f(6), f(10)] == pytest.approx([1.0, 0.55, 0.1], abs=1e-12)
    cfg.optim.schedule, cfg.optim.warmup_steps = "constant", 0
    assert lr_lambda(cfg, total=10)(7) == 1.0


def test_policy_update_with_gradient_checkpointing_matches(tiny):
    """One SGD step (lr = 1, no clipping) with optim.gradient_checkpointing's layers moves the
    weights exactly as without it, to fp32 rounding, and reports the same loss."""
    from thinkrl.trainer.common import enable_gradient_checkpointing

    model, tok = tiny
    other = copy.deepcopy(model)
    enable_gradient_checkpointing(other)
    adv = ADVANTAGES.get("grpo")(AdvantageInput(torch.tensor([1.0, 0.0, 0.0, 1.0]), GROUPS, MASK)).adv
    out = []
    for m in (model, other):
        before = weights(m)
        parts = make_parts(m, tok, optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0), max_grad_norm=1e9)
        metrics = policy_update(parts, rollout(), adv, MASK)
        out.append((metrics, {k: before[k] - q.detach() for k, q in m.named_parameters()}))
    (m1, d1), (m2, d2) = out
    assert m1["loss"] == pytest.approx(m2["loss"], abs=1e-6) and m1["trained_seqs"] == 4
    for k in d1:
        torch.testing.assert_close(d1[k], d2[k], atol=1e-5, rtol=0)
    assert any(d.abs().max() > 1e-3 for d in d1.values())


# ---------------------------------------------------------------------------
# PPO mini-batches and truncated importance sampling


def test_tis_weights_hand_worked():
    from thinkrl.algorithms import tis_weights

    old = torch.log(torch.tensor([0.5, 0.2, 0.3]))
    behaviour = torch.log(torch.tensor([0.25, 0.4, 0.3]))
    # ratios 2, 0.5 and 1; the first is truncated at the cap
    torch.testing.assert_close(tis_weights(old, behaviour, 1.5), torch.tensor([1.5, 0.5, 1.0]))


class _Recording:
    """Stands in for the policy-loss registry and records what each call saw."""

    def __init__(self, name="ppo_clip"):
        self.fn, self.calls = POLICY_LOSSES.get(name), []

    def get(self, name):
        def loss(logp, old, adv, mask, hp):
            out, metrics = self.fn(logp, old, adv, mask, hp)
            self.calls.append({"log_ratio": float(((logp.detach() - old) * mask).abs().max()), **metrics})
            return out, metrics

        return loss


def test_the_second_mini_batch_sees_a_moved_policy_and_clips(tiny, monkeypatch):
    """Two groups with the same prompt and completions, two optimizer steps: the first sees ratio 1
    exactly, the second sees the policy the first step moved (lr large enough to leave the clip range)."""
    import thinkrl.trainer.rl as rl

    model, tok = tiny
    ro = Rollout(
        prompt_ids=[PROMPTS[0]] * 4,
        completion_ids=[COMPLETIONS[0], COMPLETIONS[1]] * 2,
        texts=[""] * 4,
        truncated=[False] * 4,
    )
    lengths = torch.tensor([3, 1, 3, 1])
    mask = (torch.arange(4)[None, :] < lengths[:, None]).float()
    adv = ADVANTAGES.get("grpo")(AdvantageInput(torch.tensor([1.0, 0.0, 1.0, 0.0]), GROUPS, mask)).adv
    rec = _Recording()
    monkeypatch.setattr(rl, "POLICY_LOSSES", rec)
    parts = make_parts(
        model, tok, optimizer=lambda ps: torch.optim.AdamW(ps, lr=0.05), mini_batches=2, micro_batch_size=2
    )
    before = weights(model)
    m = policy_update(parts, ro, adv, mask)
    assert m["optimizer_steps"] == 2 and len(rec.calls) == 2
    assert rec.calls[0]["log_ratio"] < 1e-6 and rec.calls[0]["clip_frac"] == 0.0  # pi_old itself
    assert rec.calls[1]["log_ratio"] > math.log(1.2)  # moved past the clip range
    assert rec.calls[1]["clip_frac"] > 0.0
    assert any(not torch.equal(before[k], v) for k, v in weights(model).items())


def test_one_mini_batch_keeps_the_single_step(tiny, monkeypatch):
    import thinkrl.trainer.rl as rl

    model, tok = tiny
    rec = _Recording()
    monkeypatch.setattr(rl, "POLICY_LOSSES", rec)
    adv = ADVANTAGES.get("grpo")(AdvantageInput(torch.tensor([1.0, 0.0, 0.0, 1.0]), GROUPS, MASK)).adv
    m = policy_update(make_parts(model, tok, micro_batch_size=4), rollout(), adv, MASK)
    assert m["optimizer_steps"] == 1 and len(rec.calls) == 1 and rec.calls[0]["log_ratio"] == 0.0


def test_tis_scales_the_policy_gradient_by_the_truncated_ratio(tiny):
    """The engine's log-probs are pi_old - log 2 on every token: each weight is min(2, 1.5) = 1.5,
    so with SGD (lr 1, no clipping) the update is exactly 1.5 times the uncorrected one."""
    model, tok = tiny
    plain = copy.deepcopy(model)
    adv = ADVANTAGES.get("grpo")(AdvantageInput(torch.tensor([1.0, 0.0, 0.0, 1.0]), GROUPS, MASK)).adv
    mb = make_micro_batch(PROMPTS, COMPLETIONS, [0, 1, 2, 3], tok.pad_token_id)
    with torch.no_grad():
        old, _ = token_logps(model, mb)
    ro = rollout()
    ro.logps = [(old[i, : len(c)] - math.log(2)).tolist() for i, c in enumerate(COMPLETIONS)]
    sgd = dict(optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0), max_grad_norm=1e9, micro_batch_size=4)
    b0 = weights(model)
    m = policy_update(make_parts(model, tok, tis_cap=1.5, **sgd), ro, adv, MASK)
    policy_update(make_parts(plain, tok, **sgd), rollout(), adv, MASK)
    for k, v in model.named_parameters():
        moved_plain = b0[k] - dict(plain.named_parameters())[k].detach()
        torch.testing.assert_close(b0[k] - v.detach(), 1.5 * moved_plain, atol=1e-6, rtol=1e-4)
    assert math.isclose(m["logp_mismatch_mean"], math.log(2), rel_tol=1e-5)
    assert math.isclose(m["logp_mismatch_max"], math.log(2), rel_tol=1e-5)
    assert math.isclose(m["tis_weight_mean"], 1.5, rel_tol=1e-6)


def test_tis_needs_an_engine_with_log_probs(tiny):
    from thinkrl.config import ConfigError

    model, tok = tiny
    adv = torch.ones(4, 4)
    with pytest.raises(ConfigError, match="tis_cap needs the rollout engine's log-probs"):
        policy_update(make_parts(model, tok, tis_cap=2.0), rollout(), adv, MASK)


def test_mini_batches_are_checked_against_the_groups_of_a_step():
    from thinkrl.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="more than the 4 groups"):
        build_config(None, ["algo.mini_batches=5", "rollout.prompts_per_step=4"])
    with pytest.raises(ConfigError, match="algo.tis_cap must be > 0"):
        build_config(None, ["algo.tis_cap=0"])


def test_training_time_eval_honours_every_eval_key(tmp_path, monkeypatch):
    """The evaluations during training run exactly as `thinkrl eval` does: samples, temperature,
    batch size, reflection words and length from eval.*; the rollout batch size is restored after."""
    import thinkrl.trainer.rl as rl
    from thinkrl.cli import main

    seen = []
    real = rl.evaluate

    def spy(engine, tok, examples, task_cfg, **kw):
        seen.append({"batch_size": engine.batch_size, **kw})
        return real(engine, tok, examples, task_cfg, **kw)

    monkeypatch.setattr(rl, "evaluate", spy)
    rc = main(
        [
            "train",
            "model=tiny-random",
            "rollout.max_new_tokens=8",
            "rollout.prompts_per_step=2",
            "rollout.group_size=2",
            "rollout.batch_size=16",
            "progress=false",
            "task.train_size=20",
            "task.eval_size=4",
            "max_steps=1",
            "save_every=0",
            "plot=false",
            f"output_dir={tmp_path / 'run'}",
            "eval.n=4",
            "eval.samples=3",
            "eval.temperature=0.7",
            "eval.batch_size=5",
            "eval.max_new_tokens=6",
            "eval.reflection_words=[zzzq]",
            "eval.min_thinking=2",
        ]
    )
    assert rc == 0 and len(seen) == 2  # before and after
    for call in seen:
        assert call == {
            "batch_size": 5,
            "max_new_tokens": 6,
            "temperature": 0.7,
            "samples": 3,
            "reflection_words": ["zzzq"],
            "min_thinking": 2,
        }
    import json

    summary = json.loads((tmp_path / "run" / "eval_after.json").read_text())["summary"]
    assert summary["samples"] == 3 and "pass@3" in summary and summary["reflection_rate"] == 0.0
    assert summary["min_thinking"] == 2 and 0.0 <= summary["wait_rate"] <= 1.0
