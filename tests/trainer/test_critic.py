import copy

import torch

from thinkrl.trainer.batch import make_grouped_micro_batch, make_micro_batch
from thinkrl.trainer.critic import Critic, ValueModel, critic_path, prune_critic, value_stats

# Two prompts x two samples (as in test_rl.py); completion lengths 3, 1, 4, 2.
PROMPTS = [[72, 105, 33], [49, 43, 49, 61]]
COMPLETIONS = [[50, 51, 258], [52], [50, 32, 50, 258], [55, 56]]


def value_model(tiny):
    model, _ = tiny
    vm = ValueModel(copy.deepcopy(model.model), model.config.hidden_size)
    return vm


def batches(tok):
    grouped = make_grouped_micro_batch(PROMPTS, COMPLETIONS, [0, 1, 2, 3], 2, tok.pad_token_id)
    full = make_micro_batch([PROMPTS[i // 2] for i in range(4)], COMPLETIONS, [0, 1, 2, 3], tok.pad_token_id)
    return grouped, full


def test_value_head_starts_at_zero_and_reads_the_same_positions_on_both_layouts(tiny):
    vm = value_model(tiny)
    grouped, full = batches(tiny[1])
    assert torch.equal(vm(grouped), torch.zeros(4, 4))  # zero-initialised head: V = 0 everywhere
    torch.nn.init.normal_(vm.head.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    vg, vf = vm(grouped), vm(full)  # [4, 4]
    torch.testing.assert_close(vg, vf, atol=1e-5, rtol=0)  # the prompt run once gives the same values
    assert torch.all(vg[grouped.mask == 0] == 0) and vg.abs().sum() > 0


def test_critic_update_fits_the_returns(tiny):
    critic = Critic(value_model(tiny), lr=1e-2, vf_clip=None)
    grouped, _ = batches(tiny[1])
    returns = (
        torch.tensor(
            [[1.0, 1.0, 1.0, 0.0], [0.5, 0.0, 0.0, 0.0], [-1.0, -1.0, -1.0, -1.0], [0.2, 0.2, 0.0, 0.0]]
        )
        * grouped.mask
    )  # [4, 4]

    def loss_now():
        v = critic.values([grouped], 4, 4)
        return float((0.5 * (v - returns) ** 2 * grouped.mask).sum() / grouped.mask.sum())

    first = loss_now()  # V = 0: 0.5 * mean(R^2) over the 10 real tokens = 0.5 * 6.33 / 10
    assert abs(first - 0.5 * (3 + 0.25 + 4 + 0.08) / 10) < 1e-6
    m = {}
    for _ in range(15):
        m = critic.update([grouped], returns, critic.values([grouped], 4, 4))
    assert loss_now() < 0.2 * first
    assert m["critic_grad_norm"] > 0 and m["vf_clip_frac"] == 0.0


def test_value_stats_hand_worked():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    returns = torch.tensor([[1.0, 3.0, 7.0]])
    values = torch.tensor([[2.0, 2.0, 5.0]])
    # real tokens: R = 1, 3 (var 1); R - V = -1, 1 (var 1): explained variance 1 - 1/1 = 0; mean V = 2
    s = value_stats(values, returns, mask)
    assert s["value_mean"] == 2.0 and abs(s["vf_explained_var"]) < 1e-6
    assert value_stats(returns, returns, mask)["vf_explained_var"] == 1.0


def test_critic_checkpoint_round_trip_and_prune(tiny, tmp_path):
    a = Critic(value_model(tiny), lr=1e-3)
    grouped, _ = batches(tiny[1])
    a.update([grouped], grouped.mask.clone(), torch.zeros(4, 4))  # creates optimizer state
    for name in ("step-1", "step-2", "final"):
        a.save(critic_path(tmp_path, name), with_optimizer=name != "final")
    b = Critic(value_model(tiny), lr=1e-3)
    b.load_state_dict(torch.load(critic_path(tmp_path, "step-2"), weights_only=True))
    torch.testing.assert_close(b.values([grouped], 4, 4), a.values([grouped], 4, 4), atol=0, rtol=0)
    assert b.optimizer.state_dict()["state"].keys() == a.optimizer.state_dict()["state"].keys()
    assert "optimizer" not in torch.load(critic_path(tmp_path, "final"), weights_only=True)
    prune_critic(tmp_path, {"step-2"})
    assert sorted(p.name for p in (tmp_path / "critic").iterdir()) == ["final.pt", "step-2.pt"]


def test_a_nan_return_skips_the_critic_update(tiny):
    critic = Critic(value_model(tiny), lr=1e-2, vf_clip=None)
    grouped, _ = batches(tiny[1])
    before = {k: v.clone() for k, v in critic.model.state_dict().items()}
    returns = grouped.mask.clone()  # [4, 4]
    returns[0, 0] = float("nan")
    m = critic.update([grouped], returns, critic.values([grouped], 4, 4))
    assert m["critic_skip_cause"] == "nan_loss"
    assert all(torch.equal(before[k], v) for k, v in critic.model.state_dict().items())
    assert critic.optimizer.state_dict()["state"] == {}  # AdamW never stepped
    m = critic.update([grouped], grouped.mask.clone(), critic.values([grouped], 4, 4))
    assert "critic_skip_cause" not in m and not torch.equal(
        before["head.bias"], critic.model.head.bias.detach()
    )
