import math

import pytest
import torch

from thinkrl.config import TaskConfig
from thinkrl.data import IGNORE, encode_messages, encode_prompt_completion, encode_sft_rows
from thinkrl.trainer.common import collate
from thinkrl.trainer.sft import batch_loss, kd_kl, sft_loss


def test_sft_loss_hand_value():
    # vocab 2, logits [0, ln 3] everywhere: p(1) = 3/4, p(0) = 1/4.
    logits = torch.tensor([[[0.0, math.log(3)]] * 4])  # [1, 4, 2]
    labels = torch.tensor([[IGNORE, IGNORE, 1, 0]])  # position 1 predicts 1, position 2 predicts 0
    loss, n = sft_loss(logits, labels)
    assert n == 2
    assert loss.item() == pytest.approx((math.log(4 / 3) + math.log(4)) / 2, abs=1e-6)


def test_sft_loss_ignores_prompt_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 5, requires_grad=True)
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, 2, 4, 1], [IGNORE, IGNORE, 3, 0, IGNORE, IGNORE]])
    loss, n = sft_loss(logits, labels)
    assert n == 5
    other = logits.detach().clone()
    other[0, :2] = 100.0  # logits at positions that predict prompt tokens
    other[1, 0] = -50.0
    other[1, 4:] = 7.0  # positions that predict padding, and the last position (predicts nothing)
    assert sft_loss(other, labels)[0].item() == pytest.approx(loss.item(), abs=1e-6)
    loss.backward()
    assert logits.grad[0, :2].abs().sum() == 0 and logits.grad[1, 4:].abs().sum() == 0


def test_encode_messages_targets_assistant_turns_only(tiny_pair):
    _, tok = tiny_pair
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "demo", "weight": 0},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2"},
    ]
    enc = encode_messages(msgs, tok)
    full = tok.apply_chat_template([{k: m[k] for k in ("role", "content")} for m in msgs], tokenize=False)
    assert tok.decode(enc.input_ids) == full
    targets = [t for t in enc.labels if t != IGNORE]
    assert tok.decode(targets) == "A2<|im_end|>\n"  # the answer and the end-of-turn token, nothing else


def test_encode_prompt_completion_uses_task_template(tiny_pair):
    _, tok = tiny_pair
    cfg = TaskConfig(template="plain", prefill="<think>")
    enc = encode_prompt_completion("1+1", "<think> x </think> <answer> 2 </answer>", tok, cfg)
    cut = enc.labels.index(next(t for t in enc.labels if t != IGNORE))
    assert tok.decode(enc.input_ids[:cut]) == "1+1\n"
    assert tok.decode(enc.labels[cut:]) == "<think> x </think> <answer> 2 </answer><|im_end|>"


def test_changing_prompt_labels_does_not_change_the_model_loss(tiny_pair):
    model, tok = tiny_pair
    rows = [{"prompt": "What is 2+2?", "completion": "<think> ok </think> <answer> 4 </answer>"}]
    enc = encode_sft_rows(rows, tok, TaskConfig(template="plain"), max_len=256)
    batch = collate(enc, tok.pad_token_id)
    with torch.no_grad():
        loss, m = batch_loss(model, batch, bf16=False)
        logits = model(input_ids=batch["input_ids"]).logits
        full, n = sft_loss(logits, batch["labels"])
    assert loss.item() == pytest.approx(full.item(), abs=1e-5) and m["targets"] == n
    # the model's own prediction at prompt positions plays no part: only labels != IGNORE count
    assert n == len(tok("<think> ok </think> <answer> 4 </answer>").input_ids) + 1  # + EOS


def test_kd_kl_is_zero_for_equal_distributions_and_hand_value():
    a = torch.tensor([[0.0, math.log(3)]])
    assert kd_kl(a, a).item() == pytest.approx(0.0, abs=1e-7)
    # teacher (3/4, 1/4) vs student (1/2, 1/2): 3/4 ln(3/2) + 1/4 ln(1/2)
    kl = kd_kl(torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3), 0.0]]))
    assert kl.item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)


def test_sft_loss_and_gradients_with_gradient_checkpointing_match(tiny):
    """sft's gradient_checkpointing=true recomputes activations in backward: same loss and gradients."""
    import copy

    from thinkrl.trainer.common import enable_gradient_checkpointing

    model, tok = tiny
    other = copy.deepcopy(model)
    enable_gradient_checkpointing(other)
    rows = [
        {"prompt": "What is 2+2?", "completion": "<think> ok </think> <answer> 4 </answer>"},
        {"prompt": "Hi", "completion": "hello"},
    ]
    batch = collate(encode_sft_rows(rows, tok, TaskConfig(template="plain"), max_len=256), tok.pad_token_id)
    out = []
    for m in (model.train(), other.train()):
        loss, _ = batch_loss(m, batch, bf16=False)
        loss.backward()
        out.append((loss.item(), {n: q.grad for n, q in m.named_parameters()}))
    (l1, g1), (l2, g2) = out
    assert l1 == pytest.approx(l2, abs=1e-6)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=1e-5, rtol=1e-4)
