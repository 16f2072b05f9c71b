"""The trainer hands the weights to the rollout engine explicitly, once per step after the
update (``Engine.sync_weights``), and the engine copies them nowhere else."""

import torch

from thinkrl.cli import main
from thinkrl.rollout.fast import FastEngine

BASE = [
    "train",
    "model=tiny-random",
    "rollout.max_new_tokens=8",
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
    "eval.before=false",
    "eval.after=false",
    "progress=false",
    "plot=false",
    "task.template=plain",
    "dtype=fp32",
    "task.train_size=50",
    "task.eval_size=8",
    "optim.lr=0.01",
]


def test_one_sync_per_step_even_with_several_generate_calls(tmp_path, monkeypatch, byte_sum_reward):
    syncs, generates, copies = [], [], []
    real_sync, real_gen = FastEngine.sync, FastEngine.generate

    def sync(self):
        syncs.append(len(generates))  # how many generate calls came before this copy
        real_sync(self)
        copies.append(self.layers[0].wd.clone())

    monkeypatch.setattr(FastEngine, "sync", sync)
    monkeypatch.setattr(
        FastEngine, "generate", lambda self, *a, **k: generates.append(1) or real_gen(self, *a, **k)
    )
    # dynamic sampling: a step may call generate more than once (up to max_rounds)
    assert (
        main(
            [
                *BASE,
                "max_steps=3",
                f"output_dir={tmp_path / 'run'}",
                f"rewards.{byte_sum_reward}=1.0",
                "sampling.dynamic=true",
                "sampling.max_rounds=3",
            ]
        )
        == 0
    )
    assert len(syncs) == 1 + 3  # at construction, then after each of the 3 updates
    assert syncs[0] == 0 and len(generates) >= 3
    assert not torch.equal(copies[0], copies[-1])  # the updates reached the engine
