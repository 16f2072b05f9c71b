"""plugins=[file.py]: the worked example of docs/extending.md (tests/plugins/my_components.py)
registers an advantage estimator, a reward and a task, and a run names all three."""

import json
from pathlib import Path

import pytest
import torch

from thinkrl.algorithms import ADVANTAGES, AdvantageInput
from thinkrl.config import ConfigError, build_config
from thinkrl.plugins import load_plugins

PLUGIN = str(Path(__file__).parent / "plugins" / "my_components.py")


@pytest.fixture(scope="module")
def components():
    load_plugins([PLUGIN])


def test_the_estimator_subtracts_each_groups_median(components):
    # groups [1, 0, 0, 1] (torch's median of an even count is the lower middle value: 0) and
    # [1, 1, 1, 0] (median 1): advantages [1, 0, 0, 1] and [0, 0, 0, -1] on every real token
    mask = torch.tensor([[1.0, 1.0]] * 8)
    mask[2, 1] = 0.0
    out = ADVANTAGES.get("median_baseline")(
        AdvantageInput(
            rewards=torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 0]),
            group_ids=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]),
            mask=mask,
        )
    )
    want = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, -1])[:, None] * mask
    assert torch.equal(out.adv, want) and out.returns is None
    assert ADVANTAGES.trait("median_baseline", "kl_in") == "loss"


def test_the_reward_and_the_task(components):
    from thinkrl.config import TaskConfig
    from thinkrl.rewards import resolve
    from thinkrl.tasks import build_task

    fn = resolve("short_answer")
    assert [
        fn("<answer> odd </answer>", None),
        fn("<answer> seven </answer>", None),
        fn("no tags", None),
    ] == [1.0, 0.0, None]
    task = build_task(TaskConfig(name="parity", train_size=50, eval_size=10))
    assert (
        len(task.train) == 50
        and task.eval[3].question == "Is 3 even or odd?"
        and task.eval[3].answer == "odd"
    )
    assert task.check(" Odd ", task.eval[3]) and not task.check("even", task.eval[3])


def test_a_run_names_the_plugins_components(tmp_path):
    from thinkrl.cli import main

    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "model=tiny-random",
            f"plugins=[{PLUGIN}]",
            "algo.advantage=median_baseline",
            "task.name=parity",
            "task.train_size=20",
            "task.eval_size=4",
            "task.fewshot=[]",
            "rewards={accuracy: 1.0, short_answer: 0.5}",
            "rollout.max_new_tokens=8",
            "rollout.prompts_per_step=2",
            "rollout.group_size=2",
            "max_steps=2",
            "save_every=0",
            "plot=false",
            "progress=false",
            "eval.before=false",
            "eval.after=false",
            f"output_dir={out}",
        ]
    )
    assert rc == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("reward/short_answer" in r for r in rows)


def test_a_missing_or_broken_plugin_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match="plugins: file not found"):
        build_config(overrides=[f"plugins=[{tmp_path / 'nope.py'}]"])
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match="importing .* failed: RuntimeError: boom"):
        build_config(overrides=[f"plugins=[{bad}]"])
    with pytest.raises(ConfigError, match="cannot import 'no_such_module_xyz'"):
        build_config(overrides=["plugins=[no_such_module_xyz]"])
