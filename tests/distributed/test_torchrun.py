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
