"""Every estimator, policy loss, KL estimator and aggregation, selected by name, runs ``thinkrl train``."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from thinkrl.algorithms import ADVANTAGES, KL_ESTIMATORS, LOSS_AGGREGATIONS, POLICY_LOSSES
from thinkrl.cli import main

BASE = [
    "train",
    "model=tiny-random",
    "rollout.max_new_tokens=8",
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
    "eval.n=2",
    "progress=false",
    "plot=false",
    "task.template=plain",
    "dtype=fp32",
    "task.train_size=50",
    "task.eval_size=8",
    "optim.lr=0.001",
]

CASES = {
    # advantage estimators (the group ones with the default PPO-clip loss)
    "adv-grpo": ["algo.advantage=grpo"],
    "adv-dr_grpo": ["algo.advantage=dr_grpo"],
    "adv-rloo": ["algo.advantage=rloo"],
    "adv-reinforce": [
        "algo.advantage=reinforce",
        "algo.loss=pg",
        "algo.baseline_decay=0.5",
        "algo.gamma=0.9",
    ],
    "adv-reinforce_pp": ["algo.advantage=reinforce_pp", "algo.kl_coef=0.05", "algo.kl_estimator=k1"],
    "adv-reinforce_pp_baseline": [
        "algo.advantage=reinforce_pp_baseline",
        "algo.kl_coef=0.05",
        "algo.kl_in=loss",
    ],
    "adv-gae": [
        "algo.advantage=gae",
        "algo.kl_coef=0.05",
        "algo.lam=0.95",
        "algo.num_iterations=2",
        "algo.critic_lr=1e-3",
    ],
    # policy losses
    "loss-ppo_clip": ["algo.loss=ppo_clip", "algo.clip_eps_high=0.28", "algo.num_iterations=2"],
    "loss-dual_clip": ["algo.loss=dual_clip", "algo.clip_c=2.0", "algo.num_iterations=2"],
    "loss-pg": ["algo.loss=pg"],
    "loss-gspo": ["algo.loss=gspo", "algo.clip_eps=0.001", "algo.num_iterations=2"],
    "loss-kimi": ["algo.loss=kimi", "algo.advantage=dr_grpo", "algo.tau=0.5", "algo.num_iterations=2"],
    # KL estimators, in the loss
    "kl-k1": ["algo.kl_coef=0.1", "algo.kl_estimator=k1"],
    "kl-k2": ["algo.kl_coef=0.1", "algo.kl_estimator=k2"],
    "kl-k3": ["algo.kl_coef=0.1", "algo.kl_estimator=k3", "algo.entropy_coef=0.01"],
    # aggregations
    "agg-token_mean": ["algo.loss_agg=token_mean"],
    "agg-seq_mean_token_mean": ["algo.loss_agg=seq_mean_token_mean"],
    "agg-seq_mean_token_sum": ["algo.loss_agg=seq_mean_token_sum"],
    "agg-seq_mean_token_sum_norm": ["algo.loss_agg=seq_mean_token_sum_norm"],
}


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_every_registered_name_has_a_case():
    named = {c.split("-", 1)[1] for c in CASES}
    for reg in (ADVANTAGES, POLICY_LOSSES, KL_ESTIMATORS, LOSS_AGGREGATIONS):
        # thinkrl's own components (a plugin test may have registered one of its own meanwhile)
        builtin = {n for n in reg.names() if reg.get(n).__module__.startswith("thinkrl.")}
        assert builtin <= named, reg.kind


@pytest.mark.parametrize("case", list(CASES))
def test_train_runs_end_to_end(case, tmp_path, byte_sum_reward):
    out = tmp_path / "run"
    assert (
        main([*BASE, "max_steps=2", f"output_dir={out}", f"rewards.{byte_sum_reward}=1.0", *CASES[case]]) == 0
    )
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["loss"] is not None for m in metrics)  # finite (NaN is written as null)
    # the policy actually trained (grad_norm is the last pass's: with num_iterations=2 and GSPO's narrow clip,
    # every sequence ratio can be clipped in the direction of its advantage by then, and the gradient is 0)
    assert any(m["trained_seqs"] > 0 and (m["grad_norm"] > 0 or m["clip_frac"] == 1.0) for m in metrics)
    if "algo.kl_coef=0.1" in CASES[case] or "kl_coef=0.05" in " ".join(CASES[case]):
        # k1 = log pi - log pi_ref is unbiased but not non-negative per sample; k2, k3 are >= 0
        k1 = "algo.kl_estimator=k1" in CASES[case]
        assert all(m["kl"] is not None and (m["kl"] >= 0 or k1) for m in metrics)
        assert any(
            m["kl"] != 0 for m in metrics[1:]
        )  # step 2 runs a policy that moved away from the reference
    if case == "adv-gae":
        assert all(m["value_loss"] > 0 for m in metrics) and (out / "critic" / "final.pt").is_file()
        assert metrics[1]["value_mean"] != 0  # the critic trained in step 1
    if case == "adv-reinforce":
        assert metrics[0]["baseline"] == 0.0 and metrics[1]["baseline"] == pytest.approx(metrics[0]["reward"])


def test_ppo_resume_restores_the_critic(tmp_path, byte_sum_reward):
    """R: 2 steps with checkpoints, final/ deleted, resumed to 3. U: 3 steps straight. Step 3 must match."""
    common = [*BASE, f"rewards.{byte_sum_reward}=1.0", *CASES["adv-gae"]]
    r, u = tmp_path / "R", tmp_path / "U"
    assert main([*common, "max_steps=2", "save_every=1", f"output_dir={r}"]) == 0
    assert sorted(p.name for p in (r / "critic").iterdir()) == ["final.pt", "step-1.pt"]
    shutil.rmtree(r / "final")
    assert main([*common, "max_steps=3", "save_every=1", "resume=true", f"output_dir={r}"]) == 0
    assert main([*common, "max_steps=3", f"output_dir={u}"]) == 0
    mr, mu = read_jsonl(r / "metrics.jsonl"), read_jsonl(u / "metrics.jsonl")
    for key in ("reward", "loss", "value_loss", "value_mean", "grad_norm", "critic_grad_norm"):
        assert mr[2][key] == mu[2][key], key
    cr = torch.load(r / "critic" / "final.pt", weights_only=True)["model"]
    cu = torch.load(u / "critic" / "final.pt", weights_only=True)["model"]
    assert all(torch.equal(cr[k], cu[k]) for k in cr)
    # the policy folder stays a plain HF model: no critic weights in it
    assert not any(k.startswith(("head", "backbone")) for k in load_file(r / "final" / "model.safetensors"))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(r / "final")


@pytest.mark.parametrize(
    "item,match",
    [
        ("algo.kl_in=sideways", "algo.kl_in 'sideways' unknown"),
        ("algo.clip_c=0.5", "algo.clip_c must be > 1"),
        ("algo.baseline_decay=1.0", "algo.baseline_decay must be in [0, 1)"),
    ],
)
def test_bad_algo_settings_are_one_line_errors(item, match, tmp_path, capsys):
    assert main([*BASE, f"output_dir={tmp_path}", item]) == 2
    assert match in capsys.readouterr().err


def test_kl_in_reward_needs_token_rewards(tmp_path, capsys):
    assert main([*BASE, f"output_dir={tmp_path}", "algo.kl_coef=0.1", "algo.kl_in=reward"]) == 2
    err = capsys.readouterr().err
    assert "algo.kl_in=reward needs an estimator with token rewards" in err and "set algo.kl_in=loss" in err
