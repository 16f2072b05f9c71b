"""LoRA in the RL trainer: the KL reference is the policy with its adapter switched off (no
second model), checkpoints stay plain HF folders, and a resumed LoRA run is exact."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from thinkrl.cli import main
from thinkrl.config import ConfigError, LoraConfig, build_config
from thinkrl.models import load_model
from thinkrl.trainer import parts
from thinkrl.trainer.batch import logps_of, split_grouped_micro_batches
from thinkrl.trainer.common import apply_lora
from thinkrl.trainer.rl import Reference, build_parts

TINY_RUN = [
    "model=tiny-random",
    "rollout.max_new_tokens=8",
    "rollout.prompts_per_step=2",
    "rollout.group_size=4",
    "eval.n=4",
    "progress=false",
    "task.train_size=50",
    "task.eval_size=8",
]
# Two prompts x two samples (G = 2), completions of lengths 3, 1, 4, 2 (T = 4).
PROMPTS = [[72, 105, 33], [72, 105, 33], [49, 43, 49, 61], [49, 43, 49, 61]]
COMPLETIONS = [[50, 51, 258], [52], [50, 32, 50, 258], [55, 56]]
N, T = 4, 4


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def micro_batches(pad_id):
    return split_grouped_micro_batches(PROMPTS, COMPLETIONS, [0, 1], 2, 4, pad_id)


# What the log-probs are computed with: the untempered model (temperature 1.0), in fp32.
AS = {"temperature": 1.0, "bf16": False}


def with_lora(model, random_b: bool):
    """``model`` wrapped with the default adapters; ``random_b`` makes B non-zero, so the adapter
    changes the outputs (peft starts B at zero: W + BA = W)."""
    policy = apply_lora(model, LoraConfig(enabled=True))
    if random_b:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, q in policy.named_parameters():
                if "lora_B" in name:
                    q.copy_(torch.randn(q.shape, generator=g) * 0.5)
    return policy


def test_lora_section_from_overrides_and_yaml(tmp_path):
    cfg = build_config(overrides=["lora.enabled=true", "lora.r=16", "lora.target_modules=[q_proj, v_proj]"])
    assert (cfg.lora.enabled, cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (
        True,
        16,
        16,
        ["q_proj", "v_proj"],
    )
    path = tmp_path / "run.yaml"
    path.write_text("lora:\n  enabled: true\n  alpha: 32\noptim:\n  gradient_checkpointing: true\n")
    cfg = build_config(path, ["lora.dropout=0.1"])
    assert (cfg.lora.enabled, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (True, 8, 32, 0.1)
    assert cfg.optim.gradient_checkpointing is True
    with pytest.raises(ConfigError, match="unknown config key 'lora.rank'.*lora.r,"):
        build_config(overrides=["lora.rank=4"])
    with pytest.raises(ConfigError, match="lora.r must be >= 1"):
        build_config(overrides=["lora.enabled=true", "lora.r=0"])


def test_reference_with_the_adapter_off_equals_the_base_model(tiny):
    model, tok = tiny
    policy = with_lora(model, random_b=True)
    mbs = micro_batches(tok.pad_token_id)
    base, _ = load_model("tiny-random")  # a second, freshly loaded copy of the base weights
    expected = logps_of(base, mbs, N, T, **AS)  # [N, T]
    ref = Reference(policy, adapter_off=True).logps(mbs, N, T, **AS)
    assert torch.equal(ref, expected)  # the same matmuls on the same weights: bit for bit
    pol = logps_of(policy, mbs, N, T, **AS)
    assert (pol - expected).abs().max() > 1e-2  # the adapter does change the policy...
    assert torch.equal(logps_of(policy, mbs, N, T, **AS), pol)  # ...and is back on after the reference pass


def test_fresh_adapter_policy_equals_its_reference_exactly(tiny):
    model, tok = tiny
    policy = with_lora(model, random_b=False)  # B = 0: W + (alpha / r) * 0 * A adds exactly zero
    mbs = micro_batches(tok.pad_token_id)
    pol = logps_of(policy, mbs, N, T, **AS)
    ref = Reference(policy, adapter_off=True).logps(mbs, N, T, **AS)
    assert torch.equal(pol, ref)
    assert pol.abs().sum() > 0  # real log-probs, not an all-zero mask


def _count_loads(monkeypatch) -> list:
    calls = []

    def counting(name, **kw):
        calls.append(name)
        return load_model(name, **kw)

    monkeypatch.setattr(parts, "load_model", counting)  # where build_parts looks it up
    return calls


def test_build_parts_with_lora_and_kl_loads_one_model(monkeypatch):
    calls = _count_loads(monkeypatch)
    p = build_parts(build_config(overrides=TINY_RUN + ["lora.enabled=true", "algo.kl_coef=0.1"]))
    assert calls == ["tiny-random"]  # the policy only: no reference copy
    assert p.ref.model is p.model and p.ref.adapter_off
    lora = {id(q) for n, q in p.model.named_parameters() if "lora_" in n}
    trained = {id(q) for g in p.optimizer.param_groups for q in g["params"]}
    assert trained == lora and len(lora) == 2 * 4 * 2  # A and B of q, k, v, o in each of 2 layers
    assert all(not q.requires_grad for n, q in p.model.named_parameters() if "lora_" not in n)

    calls.clear()  # the same without LoRA: the reference is a second model
    p = build_parts(build_config(overrides=TINY_RUN + ["algo.kl_coef=0.1"]))
    assert calls == ["tiny-random", "tiny-random"] and p.ref.model is not p.model


def test_ppo_critic_trains_next_to_a_lora_policy(tmp_path, byte_sum_reward):
    """gae: the critic stays a full-parameter model of its own next to the LoRA policy."""
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                *TINY_RUN,
                f"output_dir={out}",
                "max_steps=1",
                "plot=false",
                "dtype=fp32",
                "task.template=plain",
                "eval.before=false",
                f"rewards.{byte_sum_reward}=1.0",
                "lora.enabled=true",
                "algo.advantage=gae",
                "algo.kl_coef=0.05",
                "algo.critic_lr=1e-3",
            ]
        )
        == 0
    )
    m = read_jsonl(out / "metrics.jsonl")[0]
    assert m["critic_grad_norm"] > 0 and "value_loss" in m
    assert (out / "critic" / "final.pt").is_file() and (out / "final" / "adapter").is_dir()


# ---------------------------------------------------------------------------
# Whole runs: R = 2 steps with checkpoints, final/ deleted, resumed to 3; U = 3 steps straight.

LORA = [
    "plot=false",
    "dtype=fp32",
    "task.template=plain",
    "optim.lr=0.01",
    "lora.enabled=true",
    "lora.r=4",
    "lora.alpha=12",
    "algo.kl_coef=0.1",
]


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, byte_sum_reward):
    root = tmp_path_factory.mktemp("lora_runs")
    common = [*TINY_RUN, *LORA, f"rewards.{byte_sum_reward}=1.0"]
    r, u = root / "R", root / "U"
    assert main(["train", *common, f"output_dir={r}", "max_steps=2", "save_every=1"]) == 0
    shutil.rmtree(r / "final")
    assert main(["train", *common, f"output_dir={r}", "max_steps=3", "save_every=1", "resume=true"]) == 0
    assert main(["train", *common, f"output_dir={u}", "max_steps=3"]) == 0
    return {"R": r, "U": u, "common": common}


def test_lora_run_saves_a_plain_model_with_the_adapter_merged(lora_runs, tiny_pair):
    """final/model.safetensors = base + (alpha / r) B A, worked out here from the saved adapter."""
    from transformers import AutoModelForCausalLM

    final = lora_runs["U"] / "final"
    saved = load_file(final / "model.safetensors")
    assert not any("lora" in k or "base_layer" in k for k in saved)
    adapter = load_file(final / "adapter" / "adapter_model.safetensors")
    base = {k: v.detach() for k, v in tiny_pair[0].state_dict().items()}
    scale = 12 / 4  # lora.alpha / lora.r
    merged = 0
    for k, w in saved.items():
        a_key = "base_model.model." + k.replace(".weight", ".lora_A.weight")
        if a_key in adapter:
            b = adapter[a_key.replace("lora_A", "lora_B")]  # [out, r]
            assert b.abs().max() > 0  # training moved B away from zero
            torch.testing.assert_close(w, base[k] + scale * b @ adapter[a_key], atol=1e-6, rtol=0)
            merged += 1
        else:
            assert torch.equal(w, base[k]), k  # the frozen weights are the base's, bit for bit
    assert merged == 4 * 2  # q, k, v, o of both layers
    model = AutoModelForCausalLM.from_pretrained(final)  # loads as a plain model
    assert type(model).__name__ == "LlamaForCausalLM"


def test_lora_kl_starts_at_zero_and_grows(lora_runs):
    metrics = read_jsonl(lora_runs["U"] / "metrics.jsonl")
    assert metrics[0]["kl"] == 0.0  # step 1: B = 0, so the policy is its reference exactly
    assert metrics[2]["kl"] > 0  # the adapter has moved the policy away from the base


def test_lora_resume_matches_an_uninterrupted_run(lora_runs):
    resumed = read_jsonl(lora_runs["R"] / "metrics.jsonl")
    straight = read_jsonl(lora_runs["U"] / "metrics.jsonl")
    assert [m["step"] for m in resumed] == [1, 2, 3]
    for key in ("reward", "loss", "kl", "grad_norm", "entropy", "trained_seqs", "response_len_mean"):
        assert resumed[2][key] == straight[2][key], key
    assert resumed[2]["trained_seqs"] > 0
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        wr = load_file(Path(lora_runs["R"]) / "final" / name)
        wu = load_file(Path(lora_runs["U"]) / "final" / name)
        assert wr.keys() == wu.keys() and all(torch.equal(wr[k], wu[k]) for k in wr), name


def test_resume_with_other_lora_settings_is_a_clear_error(lora_runs, capsys):
    r, common = lora_runs["R"], lora_runs["common"]
    assert (
        main(["train", *common, f"output_dir={r}", "max_steps=4", "resume=true", "lora.enabled=false"]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was trained with LoRA" in err[0] and "lora.enabled=true" in err[0]
    assert main(["train", *common, f"output_dir={r}", "max_steps=4", "resume=true", "lora.r=8"]) == 2
    assert "does not fit lora" in capsys.readouterr().err
