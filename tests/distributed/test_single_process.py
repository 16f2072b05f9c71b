"""In one process the data-parallel helpers change nothing and run no collective."""

import pytest
import torch

from thinkrl.algorithms import ADVANTAGES, AdvantageInput, uses_batch_statistics
from thinkrl.config import ConfigError, build_config
from thinkrl.distributed import torch_dist as dist


def test_one_process_helpers_are_identities(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist.init() == 1 and dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    assert not torch.distributed.is_initialized()  # no process group was created
    assert dist.sum_floats([1.5, 2.0]) == [1.5, 2.0]
    assert dist.any_true(False) is False and dist.any_true(True) is True
    assert dist.reduce_dict({"a": 1.0}) == {"a": 1.0}
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.tensor([1.0, -2.0, 3.0])
    assert dist.sum_gradients([w], 0.25) == [0.25]
    assert torch.equal(w.grad, torch.tensor([1.0, -2.0, 3.0]))  # untouched


def test_advantages_in_one_process_are_the_estimators_own():
    rewards, groups = torch.tensor([1.0, 0.0, 0.5, 0.5]), torch.tensor([0, 0, 1, 1])
    mask = torch.ones(4, 3)
    inp = AdvantageInput(rewards, groups, mask)
    for name in ("grpo", "reinforce_pp"):
        want = ADVANTAGES.get(name)(inp).adv
        got = dist.advantages(ADVANTAGES.get(name), inp, whole_batch=uses_batch_statistics(name)).adv
        assert torch.equal(got, want)
    # the whitening estimators declare it where they register
    assert [n for n in ADVANTAGES.names() if uses_batch_statistics(n)] == [
        "gae",
        "reinforce_pp",
        "reinforce_pp_baseline",
    ]


def test_group_seed_depends_on_seed_step_and_group_only():
    assert dist.group_seed(0, 1, 2) == dist.group_seed(0, 1, 2)
    assert (
        len(
            {
                dist.group_seed(0, 1, 2),
                dist.group_seed(0, 1, 3),
                dist.group_seed(0, 2, 2),
                dist.group_seed(1, 1, 2),
            }
        )
        == 4
    )


def test_unknown_strategy_is_one_config_error():
    with pytest.raises(ConfigError, match="distributed.strategy 'zero' unknown; choose from: ddp, fsdp"):
        build_config(overrides=["distributed.strategy=zero"])


def test_fsdp_helpers_do_nothing_in_one_process(monkeypatch):
    """strategy=fsdp in one process: no sharding, no collective, the model as it is."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist.init("fsdp") == 1 and dist.strategy() == "ddp"
    model = torch.nn.Linear(3, 2)
    dist.shard_policy(model)
    assert dist.fsdp_root(model) is None and dist.full_model(model) is model
    assert list(dist.even_passes(model, [1, 2])) == [1, 2]
    fn = lambda x: x + 1  # noqa: E731
    assert dist.through_root(model, fn) is fn
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sd = dist.optimizer_state(opt)
    assert torch.equal(sd["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    dist.init("ddp")


def test_collect_groups_in_one_process_is_the_samplers_own():
    """One process: thinkrl.sampling.collect_groups, with one seed iterator over the rounds."""
    from thinkrl.rollout import Rollout
    from thinkrl.sampling import Groups

    seen_seeds = []

    def run(exs, seeds):
        seen_seeds.extend(next(seeds) for _ in exs)
        G = 2
        totals = [float(e % 2) * j for e in exs for j in range(G)]  # odd prompts vary, even ones do not
        n = len(exs) * G
        ro = Rollout(prompt_ids=[[0]] * n, completion_ids=[[1]] * n, texts=["x"] * n, truncated=[False] * n)
        return Groups(list(exs), [("p", "")] * len(exs), ro, ["x"] * n, totals, {})

    counter = iter(range(100))
    kept, seen, stats = dist.collect_groups(
        lambda n: [next(counter) for _ in range(n)],
        run,
        2,
        dynamic=True,
        max_rounds=5,
        seeds=dist.GroupSeeds(0, 1),
    )
    # draws [0, 1] (keeps 1), then [2] (none), then [3] (keeps 3): two refill rounds
    assert kept.examples == [1, 3] and seen.examples == [0, 1, 2, 3]
    assert stats == {"dynamic_rounds": 2, "dynamic_kept_groups": 2, "dynamic_generated_groups": 4}
    assert seen_seeds == [dist.group_seed(0, 1, g) for g in range(4)]  # group g of the step: seed g
