"""Data parallelism under torchrun, on CPU with gloo (thinkrl/distributed/torch_dist.py).

Each run is a real ``python -m torch.distributed.run --standalone --nproc_per_node=2 -m
thinkrl ...`` next to the one-process ``python -m thinkrl ...`` on the same global batch.
``distributed.seed_by_group=true`` makes a group's completions a function of (seed, step,
group index) alone, so both see the same rollouts; in fp32 they must then compute the same
gradient, up to the order of float sums (measured: weights within ~2e-6 after two steps,
where one step moves them by ~1e-3).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]

REWARD = '''
def byte_sum(completion, example):
    """Deterministic and varied over random completions: groups get non-zero advantages."""
    return (sum(map(ord, completion)) % 7) / 6
'''

# A whole-batch estimator (REINFORCE++ whitens over the batch: its advantages need the
# gathered rewards) with token-mean aggregation (its normaliser needs the global token count),
# and two mini-batches of one group each: over two ranks, each optimizer step has one rank
# with a group and one with none, whose zero gradients the sum must leave alone. The entropy
# bonus keeps the loss itself away from 0 (whitened advantages average to 0), so comparing it means something.
RL_CONFIG = """\
model: tiny-random
max_steps: 2
dtype: fp32
threads: 1
save_every: 1
plot: false
progress: false
rewards: {{accuracy: 0.0, format: 0.0, "{reward}:byte_sum": 1.0}}
rollout: {{prompts_per_step: 2, group_size: 4, max_new_tokens: 8}}
eval: {{before: false, after: false}}
optim: {{lr: 0.001}}
task: {{train_size: 20, eval_size: 4}}
algo: {{advantage: reinforce_pp, mini_batches: 2, entropy_coef: 0.01}}
distributed: {{seed_by_group: true}}
"""

# DAPO dynamic sampling: a binary reward on two samples per prompt leaves many groups with equal
# rewards, so steps refill, with refills (4 - kept) that do not always split over two ranks.
THIRDS = """
def thirds(completion, example):
    return float(sum(map(ord, completion)) % 3 == 0)
"""
DYNAMIC_CONFIG = (
    RL_CONFIG.replace('"{reward}:byte_sum"', '"{reward}:thirds"')
    .replace("prompts_per_step: 2, group_size: 4", "prompts_per_step: 4, group_size: 2")
    .replace(
        "algo: {{advantage: reinforce_pp, mini_batches: 2, entropy_coef: 0.01}}",
        "algo: {{advantage: grpo, mini_batches: 2}}\nsampling: {{dynamic: true, max_rounds: 8}}",
    )
)


def thinkrl(nproc: int, *args: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "THINKRL_BF16": "0",
        "HF_HUB_OFFLINE": "1",
    }
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    res = subprocess.run(
        [sys.executable, *launch, "-m", "thinkrl", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert (res.returncode == 0) == ok, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict:
    return load_file(folder / "model.safetensors")


def assert_same_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def assert_same_step(m1: dict, m2: dict) -> None:
    assert m1["step"] == m2["step"]
    for k in ("reward", "reward_std", "response_len_mean", "generated_seqs", "trained_seqs"):
        assert m1[k] == pytest.approx(m2[k], abs=1e-6), k  # the same rollouts, counted once each
    for k in ("loss", "entropy"):
        assert m1[k] == pytest.approx(m2[k], abs=1e-5), k
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)


@pytest.fixture(scope="module")
def rl_runs(tmp_path_factory):
    """The same two RL steps in one process and over two ranks."""
    tmp = tmp_path_factory.mktemp("ddp")
    (tmp / "reward.py").write_text(REWARD)
    (tmp / "rl.yaml").write_text(RL_CONFIG.format(reward=tmp / "reward.py"))
    thinkrl(1, "train", "rl.yaml", "output_dir=one", cwd=tmp)
    thinkrl(2, "train", "rl.yaml", "output_dir=two", cwd=tmp)
    return tmp


def test_two_ranks_equal_one_process_on_the_same_global_batch(rl_runs):
    one, two = rl_runs / "one", rl_runs / "two"
    m1, m2 = metrics(one), metrics(two)
    assert [m["step"] for m in m2] == [1, 2]  # rank 0 alone writes: each step once
    for a, b in zip(m1, m2):
        assert_same_step(a, b)
    assert m1[0]["grad_norm"] > 0.1 and m1[0]["trained_seqs"] == 8  # a real update, over every group
    assert m2[0]["optimizer_steps"] == 2 and abs(m2[0]["loss"]) > 1e-3
    # the same samples (rank 0 writes the gathered batch's), the same weights after each step
    assert (one / "samples.jsonl").read_text() == (two / "samples.jsonl").read_text()
    assert_same_weights(weights(one / "checkpoints" / "step-1"), weights(two / "checkpoints" / "step-1"))
    assert_same_weights(weights(one / "final"), weights(two / "final"))
    moved = max(
        float((a - b).abs().max())
        for a, b in zip(weights(two / "checkpoints" / "step-1").values(), weights(two / "final").values())
    )
    assert moved > 1e-4  # a step moves the weights far more than the tolerance
    # full HF folders, written once
    assert (two / "final" / "config.json").is_file() and (two / "config.yaml").is_file()
    assert not list(two.rglob("*.tmp"))


def test_resume_on_another_world_size_continues_exactly(rl_runs):
    """Saved by two ranks at step 1, resumed by one process: step 2 is the same step."""
    run = rl_runs / "resumed"
    shutil.copytree(rl_runs / "two", run)
    shutil.rmtree(run / "final")
    (run / "checkpoints" / "latest").write_text("step-1\n")
    shutil.rmtree(run / "checkpoints" / "step-2", ignore_errors=True)
    thinkrl(1, "train", "rl.yaml", "output_dir=resumed", "resume=true", cwd=rl_runs)
    m = metrics(run)
    assert [x["step"] for x in m] == [1, 2]  # each step once: the redone step 2 replaced nothing twice
    assert_same_step(m[1], metrics(rl_runs / "two")[1])
    assert_same_weights(weights(run / "final"), weights(rl_runs / "two" / "final"))


def test_sft_two_ranks_equal_one_process(tmp_path):
    rows = [
        {
            "prompt": f"What is {a} + {b}?",
            "completion": f"<think> {a} plus {b} </think> <answer> {a + b} </answer>" + " x" * a,
        }
        for a, b in ((1, 2), (30, 4), (5, 66), (7, 8), (9, 10))
    ]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        "model=tiny-random",
        "data=sft.jsonl",
        "batch_size=5",
        "max_steps=1",
        "lr=1e-3",
        "dtype=fp32",
        "progress=false",
        "save_every=0",
        "task.template=plain",
    ]
    thinkrl(1, "sft", *args, "output_dir=one", cwd=tmp_path)
    thinkrl(2, "sft", *args, "output_dir=two", cwd=tmp_path)  # rows 0-1 on rank 0, 2-4 on rank 1
    (m1,), (m2,) = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert m1["targets"] == m2["targets"] > 0
    for k in ("loss", "ce"):
        assert m1[k] == pytest.approx(m2[k], abs=1e-5), k
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)
    assert_same_weights(weights(tmp_path / "one" / "final"), weights(tmp_path / "two" / "final"))


def test_a_batch_that_does_not_split_over_the_ranks_is_one_config_error(rl_runs):
    res = thinkrl(
        2, "train", "rl.yaml", "output_dir=odd", "rollout.prompts_per_step=3", cwd=rl_runs, ok=False
    )
    assert "thinkrl: error: rollout.prompts_per_step=3 does not split over 2 processes" in res.stderr
    # one line per rank and no traceback through thinkrl (torchrun then prints its own report)
    assert res.stderr.count("thinkrl: error:") == 2 and "thinkrl/trainer" not in res.stderr
    assert not (rl_runs / "odd").exists()  # refused before anything was written


@pytest.fixture(scope="module")
def fsdp_run(rl_runs):
    """The same two steps over two ranks with the policy sharded by FSDP2 (one unit). Each of
    the two mini-batches holds one rank's group only, so the other rank runs a dummy pass to
    keep FSDP's collectives in step."""
    thinkrl(2, "train", "rl.yaml", "output_dir=fsdp", "distributed.strategy=fsdp", cwd=rl_runs)
    return rl_runs / "fsdp"


def test_fsdp_two_ranks_equal_one_process_and_ddp(rl_runs, fsdp_run):
    one, two = rl_runs / "one", rl_runs / "two"
    m1, mf = metrics(one), metrics(fsdp_run)
    assert [m["step"] for m in mf] == [1, 2]
    for a, b in zip(m1, mf):
        assert_same_step(a, b)
    for a, b in zip(metrics(two), mf):
        assert_same_step(a, b)
    assert (one / "samples.jsonl").read_text() == (fsdp_run / "samples.jsonl").read_text()
    for name in ("checkpoints/step-1", "final"):
        assert_same_weights(weights(one / name), weights(fsdp_run / name))
        assert_same_weights(weights(two / name), weights(fsdp_run / name))
    # the optimizer state was gathered from the shards: whole moments, as one process saves them
    s1 = torch.load(one / "checkpoints" / "step-1" / "trainer_state.pt", weights_only=False)["optimizer"]
    sf = torch.load(fsdp_run / "checkpoints" / "step-1" / "trainer_state.pt", weights_only=False)["optimizer"]
    assert s1["state"].keys() == sf["state"].keys()
    for i in s1["state"]:
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sf["state"][i][k], s1["state"][i][k], rtol=1e-4, atol=1e-7)
    # a full HF folder, as one process writes it (the tied embedding saved once)
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(fsdp_run / "final")
    assert lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    assert_same_weights(
        {k: v for k, v in lm.state_dict().items() if k != "lm_head.weight"}, weights(fsdp_run / "final")
    )


def test_fsdp_checkpoint_resumes_in_one_process_and_on_two_ranks(rl_runs, fsdp_run):
    """step-1 of the FSDP run, resumed by one process (DDP path) and by two FSDP ranks (the
    whole optimizer state re-sharded): both redo step 2 exactly."""
    for name, nproc, extra in (("fsdp_r1", 1, []), ("fsdp_r2", 2, ["distributed.strategy=fsdp"])):
        run = rl_runs / name
        shutil.copytree(fsdp_run, run)
        shutil.rmtree(run / "final")
        shutil.rmtree(run / "checkpoints" / "step-2", ignore_errors=True)
        (run / "checkpoints" / "latest").write_text("step-1\n")
        thinkrl(nproc, "train", "rl.yaml", f"output_dir={name}", "resume=true", *extra, cwd=rl_runs)
        m = metrics(run)
        assert [x["step"] for x in m] == [1, 2]
        assert_same_step(m[1], metrics(fsdp_run)[1])
        assert_same_weights(weights(run / "final"), weights(fsdp_run / "final"))


def test_fsdp_with_activation_checkpointing_equals_one_process(rl_runs):
    """optim.gradient_checkpointing=true under FSDP2: the layers recomputed in backward run on
    the weights the root gathered, so both steps equal the one-process run without it."""
    thinkrl(
        2,
        "train",
        "rl.yaml",
        "output_dir=fsdp_gc",
        "distributed.strategy=fsdp",
        "optim.gradient_checkpointing=true",
        cwd=rl_runs,
    )
    one, gc = rl_runs / "one", rl_runs / "fsdp_gc"
    for a, b in zip(metrics(one), metrics(gc), strict=True):
        assert_same_step(a, b)
    assert_same_weights(weights(one / "final"), weights(gc / "final"))


def test_fsdp_with_lora_equals_one_process_and_resumes(rl_runs):
    """LoRA under FSDP2, with the KL reference (the base, adapters off): the adapters and the
    merged weights of two sharded ranks are one process's, and the sharded run's step-1
    checkpoint (its adapter) resumes on two ranks to the same final adapter."""
    lora = ["lora.enabled=true", "algo.kl_coef=0.05"]
    thinkrl(1, "train", "rl.yaml", "output_dir=lora_one", *lora, cwd=rl_runs)
    thinkrl(2, "train", "rl.yaml", "output_dir=lora_fsdp", "distributed.strategy=fsdp", *lora, cwd=rl_runs)
    one, sharded = rl_runs / "lora_one", rl_runs / "lora_fsdp"
    for a, b in zip(metrics(one), metrics(sharded), strict=True):
        assert_same_step(a, b)
    assert metrics(one)[1]["kl"] > 0  # the reference was used
    adapter = "final/adapter/adapter_model.safetensors"
    assert_same_weights(load_file(one / adapter), load_file(sharded / adapter))
    assert_same_weights(weights(one / "final"), weights(sharded / "final"))
    assert max(float(v.abs().max()) for k, v in load_file(one / adapter).items() if "lora_B" in k) > 0
    run = rl_runs / "lora_r2"
    shutil.copytree(sharded, run)
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step-2", ignore_errors=True)
    (run / "checkpoints" / "latest").write_text("step-1\n")
    args = ["output_dir=lora_r2", "resume=true", "distributed.strategy=fsdp", *lora]
    thinkrl(2, "train", "rl.yaml", *args, cwd=rl_runs)
    assert_same_step(metrics(run)[1], metrics(sharded)[1])
    assert_same_weights(load_file(run / adapter), load_file(sharded / adapter))


def test_dynamic_sampling_two_ranks_equal_one_process(tmp_path):
    """Every round is decided on the gathered groups, so both see the same rounds, keep the
    same groups, and train on the same batch."""
    (tmp_path / "thirds.py").write_text(THIRDS)
    (tmp_path / "dyn.yaml").write_text(DYNAMIC_CONFIG.format(reward=tmp_path / "thirds.py"))
    thinkrl(1, "train", "dyn.yaml", "output_dir=one", cwd=tmp_path)
    thinkrl(2, "train", "dyn.yaml", "output_dir=two", cwd=tmp_path)
    m1, m2 = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert sum(m["dynamic_rounds"] for m in m1) > 0  # some step refilled
    assert any(m["dynamic_generated_groups"] % 2 for m in m1)  # with a refill that did not split evenly
    for a, b in zip(m1, m2):
        assert_same_step(a, b)
        for k in ("dynamic_rounds", "dynamic_kept_groups", "dynamic_generated_groups"):
            assert a[k] == b[k], k
        assert a["dynamic_kept_groups"] == 4 and "dynamic_dropped_groups" not in b
    assert (tmp_path / "one" / "samples.jsonl").read_text() == (
        tmp_path / "two" / "samples.jsonl"
    ).read_text()
    for name in ("checkpoints/step-1", "final"):
        assert_same_weights(weights(tmp_path / "one" / name), weights(tmp_path / "two" / name))


def test_gae_two_ranks_equal_one_process(rl_runs):
    """PPO's critic is replicated like the policy: its gradients are summed over the ranks and its
    loss normalised by the global token count; GAE whitens over the gathered batch."""
    cfg = (rl_runs / "rl.yaml").read_text()
    gae = "algo: {advantage: gae, mini_batches: 2, critic_lr: 0.001}"
    (rl_runs / "gae.yaml").write_text(
        cfg.replace("algo: {advantage: reinforce_pp, mini_batches: 2, entropy_coef: 0.01}", gae)
    )
    assert gae in (rl_runs / "gae.yaml").read_text()
    thinkrl(1, "train", "gae.yaml", "output_dir=gae_one", cwd=rl_runs)
    thinkrl(2, "train", "gae.yaml", "output_dir=gae_two", cwd=rl_runs)
    one, two = rl_runs / "gae_one", rl_runs / "gae_two"
    for a, b in zip(metrics(one), metrics(two)):
        assert_same_step(a, b)
        for k in ("value_loss", "value_mean", "vf_explained_var"):
            assert a[k] == pytest.approx(b[k], abs=1e-6), k
        assert a["critic_grad_norm"] == pytest.approx(b["critic_grad_norm"], rel=1e-5)
    assert metrics(one)[1]["critic_grad_norm"] > 0.1  # the critic really trained
    assert_same_weights(weights(one / "final"), weights(two / "final"))
    c1 = torch.load(one / "critic" / "final.pt", weights_only=True)["model"]
    c2 = torch.load(two / "critic" / "final.pt", weights_only=True)["model"]
    assert_same_weights(c1, c2)
    assert float(c1["head.weight"].abs().max()) > 1e-4  # moved from its zero init


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_sft_and_dpo_fsdp_two_ranks_equal_one_process(tmp_path, command):
    """Two steps with a checkpoint after each: the FSDP ranks' loss, grad norm and gathered
    weights are one process's; the step-1 checkpoint then resumes in one process."""
    if command == "sft":
        rows = [
            {"prompt": f"What is {a} + {b}?", "completion": f"<answer> {a + b} </answer>" + " x" * a}
            for a, b in ((1, 2), (30, 4), (5, 66), (7, 8))
        ]
    else:
        rows = [
            {
                "prompt": f"What is {a} + {b}?",
                "chosen": f"<answer> {a + b} </answer>",
                "rejected": f"<answer> {a - b} </answer>" + " y" * a,
            }
            for a, b in ((1, 2), (3, 4), (5, 6), (7, 8))
        ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        "model=tiny-random",
        "data=rows.jsonl",
        "batch_size=4",
        "max_steps=2",
        "lr=1e-3",
        "dtype=fp32",
        "progress=false",
        "save_every=1",
        "task.template=plain",
    ]
    thinkrl(1, command, *args, "output_dir=one", cwd=tmp_path)
    thinkrl(2, command, *args, "output_dir=fsdp", "strategy=fsdp", cwd=tmp_path)
    one, fsdp = tmp_path / "one", tmp_path / "fsdp"
    m1, mf = metrics(one), metrics(fsdp)
    assert [m["step"] for m in mf] == [1, 2]
    for a, b in zip(m1, mf):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert m1[1]["loss"] != pytest.approx(m1[0]["loss"], abs=1e-3)  # the first step changed the model
    # DPO: AdamW's first step divides each gradient by its own magnitude, so an entry whose
    # gradient is ~0 turns the float-order noise of the summed gradient into a ~1e-5 weight
    # difference (the DDP ranks show the same 1.2e-5 here, bit for bit FSDP's); a step moves
    # the weights by ~1e-3.
    atol = 1e-5 if command == "sft" else 3e-5
    for name in ("checkpoints/step-1", "final"):
        assert_same_weights(weights(one / name), weights(fsdp / name), atol=atol)
    if command == "sft":  # with activation checkpointing: the same steps
        thinkrl(
            2,
            command,
            *args,
            "output_dir=fsdp_gc",
            "strategy=fsdp",
            "gradient_checkpointing=true",
            cwd=tmp_path,
        )
        for a, b in zip(m1, metrics(tmp_path / "fsdp_gc"), strict=True):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert_same_weights(weights(one / "final"), weights(tmp_path / "fsdp_gc" / "final"), atol=atol)
        # and with LoRA: one process and two sharded ranks train the same adapter
        lora = ["lora.enabled=true", "lr=1e-2"]
        thinkrl(1, command, *args, "output_dir=lora_one", *lora, cwd=tmp_path)
        thinkrl(2, command, *args, "output_dir=lora_fsdp", "strategy=fsdp", *lora, cwd=tmp_path)
        for a, b in zip(metrics(tmp_path / "lora_one"), metrics(tmp_path / "lora_fsdp"), strict=True):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        adapter = "final/adapter/adapter_model.safetensors"
        assert_same_weights(
            load_file(tmp_path / "lora_one" / adapter), load_file(tmp_path / "lora_fsdp" / adapter)
        )
    shutil.rmtree(fsdp / "final")
    shutil.rmtree(fsdp / "checkpoints" / "step-2", ignore_errors=True)
    (fsdp / "checkpoints" / "latest").write_text("step-1\n")
    thinkrl(1, command, *args, "output_dir=fsdp", "resume=true", cwd=tmp_path)
    assert metrics(fsdp)[1]["loss"] == pytest.approx(m1[1]["loss"], abs=1e-5)
    assert_same_weights(weights(one / "final"), weights(fsdp / "final"), atol=atol)


# A multi-turn environment for tiny-random's random bytes: a turn ends at any vowel or digit
# (about one token in 17), the environment answers the first turn with an observation, and the
# episode ends after the second turn.
CHATTER = Path(__file__).with_name("chatter_env.py")  # copied to tmp_path by the tests


@pytest.mark.parametrize("decoder", ["cache", "reprefill"])
def test_multi_turn_two_ranks_equal_one_process(tmp_path, decoder):
    """Multi-turn episodes are data-parallel: with seed_by_group each group's episodes are a
    function of its seed alone (one stream per episode with the cache decoder, one seeded call
    per group with the re-prefill decoder), so two ranks sample the one process's episodes,
    observations and loss masks included, and train to the same weights."""
    (tmp_path / "reward.py").write_text(REWARD)
    shutil.copy(CHATTER, tmp_path / "chatter.py")
    cfg = RL_CONFIG.format(reward=tmp_path / "reward.py").replace(
        "rollout: {prompts_per_step: 2, group_size: 4, max_new_tokens: 8}",
        "rollout: {prompts_per_step: 2, group_size: 4, max_new_tokens: 24}\n"
        f"env: {{name: chatter, max_turns: 3, decoder: {decoder}}}\n"
        f"plugins: [{tmp_path / 'chatter.py'}]\nlog_samples: 8",
    )
    assert "name: chatter" in cfg
    (tmp_path / "mt.yaml").write_text(cfg)
    thinkrl(1, "train", "mt.yaml", "output_dir=one", cwd=tmp_path)
    thinkrl(2, "train", "mt.yaml", "output_dir=two", cwd=tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    for a, b in zip(metrics(one), metrics(two), strict=True):
        assert_same_step(a, b)
        assert a["tool/calls_per_episode"] == b["tool/calls_per_episode"]
    samples = (one / "samples.jsonl").read_text()
    assert samples == (two / "samples.jsonl").read_text()
    turns = [[t["role"] for t in json.loads(x)["episode"]["turns"]] for x in samples.splitlines()]
    assert ["assistant", "tool", "assistant"] in turns  # real episodes: an observation between turns
    assert_same_weights(weights(one / "final"), weights(two / "final"))
