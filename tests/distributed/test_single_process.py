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
    assert dist.shard([1, 2, 3]) == [1, 2, 3]
    assert dist.sum_floats([1.5, 2.0]) == [1.5, 2.0]
    assert dist.any_true(False) is False and dist.any_true(True) is True
    assert dist.reduce_dict({"a": 1.0}) == {"a": 1.0}
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.tensor([1.0, -2.0, 3.0])
    assert dist.sum_gradients([w], 0.25) == [0.25]
    assert torch.equal(w.grad, torch.tensor([1.0, -2.0, 3.0]))  # untouched
    draw = dist.sharded_draw(lambda n: list(range(n)))
    assert draw(4) == [0, 1, 2, 3] and draw.last == [0, 1, 2, 3]


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
