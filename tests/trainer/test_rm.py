"""Bradley-Terry reward models: the loss by hand, training on a separable toy set, scoring."""

import json
import math

import torch

from thinkrl.trainer.rm import RMConfig, bradley_terry_loss, reward_model_from, scores, train_rm


def test_bradley_terry_loss_hand_worked():
    c, r = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    # -log sigmoid(2) = log(1 + e^-2) = 0.126928; -log sigmoid(0) = log 2 = 0.693147
    assert math.isclose(
        float(bradley_terry_loss(c, r)), (math.log1p(math.exp(-2)) + math.log(2)) / 2, rel_tol=1e-6
    )
    # a margin of 1 asks chosen to win by 1: -log sigmoid(1) and -log sigmoid(-1)
    want = (math.log1p(math.exp(-1)) + math.log1p(math.exp(1))) / 2
    assert math.isclose(float(bradley_terry_loss(c, r, margin=1.0)), want, rel_tol=1e-6)


def _toy_pairs(path, n=48):
    """Separable: the chosen response is always 'yes yes yes', the rejected 'no no no'."""
    rows = [{"prompt": f"question {i}?", "chosen": "yes yes yes", "rejected": "no no no"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _toy_config(tmp_path, data) -> RMConfig:
    """3 epochs over the toy pairs, a quarter held out, fp32."""
    return RMConfig(
        model="tiny-random",
        data=str(data),
        output_dir=str(tmp_path / "rm"),
        epochs=3,
        batch_size=8,
        lr=3e-3,
        eval_fraction=0.25,
        dtype="fp32",
        progress=False,
    )


def test_training_raises_held_out_pair_accuracy_and_saves_a_loadable_model(tmp_path):
    from thinkrl.rewards.learned import load_reward_model, rm_scores

    data = _toy_pairs(tmp_path / "pairs.jsonl")
    cfg = _toy_config(tmp_path, data)
    cfg.validate()
    final = train_rm(cfg)
    meta = json.loads((final / "thinkrl_rm.json").read_text())
    assert meta["eval_pairs"] == 12 and meta["train_pairs"] == 36
    assert meta["pair_accuracy"] == 1.0 and meta["pair_accuracy"] > meta["pair_accuracy_before"] - 1e-9
    steps = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1]["loss"] < steps[0]["loss"]
    # it loads back as a plain HF sequence-classification folder and as an RL reward
    rm, tok, _ = load_reward_model(str(final))
    assert rm.config.num_labels == 1
    good, bad = rm_scores(str(final), ["question 99?", "question 99?"], ["yes yes yes", "no no no"])
    assert good > bad


def test_scores_are_deterministic_and_a_batch_equals_its_rows(tiny_pair):
    model, tok = tiny_pair
    import copy

    torch.manual_seed(0)
    rm = reward_model_from(copy.deepcopy(model)).eval()
    seqs = [[5, 6, 7, 8, 9], [5, 6], [10, 11, 12]]
    with torch.no_grad():
        batch = scores(rm, seqs, tok.pad_token_id)
        again = scores(rm, seqs, tok.pad_token_id)
        one = torch.cat([scores(rm, [s], tok.pad_token_id) for s in seqs])
    assert torch.equal(batch, again)
    torch.testing.assert_close(batch, one, atol=1e-5, rtol=1e-5)
    assert len(set(batch.tolist())) == 3  # the head is not constant


def test_lora_rm_trains_its_head_and_adapters_and_saves_the_merged_model(tmp_path):
    """lora.enabled=true: the backbone's own weights stay frozen, the adapters and the new head
    train; final/ is the merged plain model, whose scores equal the LoRA model's."""
    from thinkrl.rewards.learned import load_reward_model
    from thinkrl.trainer.rm import _setup

    data = _toy_pairs(tmp_path / "pairs.jsonl")
    cfg = _toy_config(tmp_path, data)
    cfg.lora.enabled, cfg.lora.r = True, 4
    cfg.validate()
    rm, tok, _, eval_pairs, _ = _setup(cfg, None, "cpu", False)
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".score." in n for n in trainable)
    assert any(".score." in n for n in trainable)
    final = train_rm(cfg)
    meta = json.loads((final / "thinkrl_rm.json").read_text())
    assert meta["lora"]["r"] == 4 and meta["pair_accuracy"] == 1.0
    merged, _, _ = load_reward_model(str(final), "cpu")
    assert type(merged).__name__ == "LlamaForSequenceClassification"
    # the merged folder scores as the trained LoRA model did: reload it from its adapter
    from thinkrl.trainer.checkpoint import load_adapter

    load_adapter(rm, final)
    seqs = [p.prompt + p.chosen for p in eval_pairs] + [p.prompt + p.rejected for p in eval_pairs]
    with torch.no_grad():
        want = scores(rm.eval(), seqs, tok.pad_token_id)
        got = scores(merged, seqs, tok.pad_token_id)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    n = len(eval_pairs)
    assert bool((got[:n] > got[n:]).all())
