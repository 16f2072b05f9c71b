import pytest
import torch

from thinkrl.trainer.batch import (
    fill_rows,
    make_grouped_micro_batch,
    make_micro_batch,
    split_grouped_micro_batches,
    split_micro_batches,
    token_logps,
)


def test_make_micro_batch_layout():
    mb = make_micro_batch([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], index=[3, 1], pad_id=0)
    # P = 3, T = 3: prompts left-padded to 3, completions right-padded to 3
    assert mb.prompt_len == 3
    assert mb.input_ids.tolist() == [[5, 6, 7, 1, 2, 0], [0, 0, 8, 3, 4, 9]]
    assert mb.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert mb.mask.tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    assert mb.mask.dtype == torch.float32
    assert mb.index.tolist() == [3, 1]


def test_make_micro_batch_empty_completions_keep_one_column():
    mb = make_micro_batch([[5, 6]], [[]], index=[0], pad_id=9)
    assert mb.input_ids.tolist() == [[5, 6, 9]] and mb.mask.tolist() == [[0.0]]


def test_split_micro_batches_groups_by_length_and_covers_rows():
    prompts = [[1] * n for n in (5, 2, 9, 2, 3)]
    completions = [[2] * n for n in (1, 1, 4, 2, 3)]
    mbs = split_micro_batches(prompts, completions, rows=[0, 1, 2, 4], size=2, pad_id=0)
    # total lengths: row0 6, row1 3, row2 13, row4 6 -> sorted (3, r1), (6, r0), (6, r4), (13, r2)
    assert [mb.index.tolist() for mb in mbs] == [[1, 0], [4, 2]]
    assert [mb.prompt_len for mb in mbs] == [5, 9]


ROWS = [  # (prompt, completion): different prompt lengths force left padding
    ([72, 101, 108, 108, 111, 44, 32], [119, 111, 114, 108, 100, 258]),
    ([65, 66], [67, 68, 69]),
    ([33, 34, 35, 36], [40]),
]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logps_equals_full_forward(tiny_pair, temperature):
    model = tiny_pair[0]
    mb = make_micro_batch([p for p, _ in ROWS], [c for _, c in ROWS], [0, 1, 2], pad_id=256)
    P, T = mb.prompt_len, mb.mask.shape[1]
    with torch.no_grad():
        logp, ent = token_logps(model, mb, temperature=temperature, with_entropy=True)
        positions = (mb.attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = (
            model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=positions).logits[
                :, P - 1 : P - 1 + T
            ]
            / temperature
        )  # [b, T, V]
        ref_all = torch.log_softmax(logits.float(), -1)
        ref = ref_all.gather(-1, mb.input_ids[:, P:, None]).squeeze(-1) * mb.mask  # [b, T]
        ref_ent = -(ref_all.exp() * ref_all).sum(-1)
    assert logp.shape == (3, 6)
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=0)
    m = mb.mask.bool()
    torch.testing.assert_close(ent[m], ref_ent[m], atol=1e-5, rtol=0)
    assert torch.all(logp[~m] == 0)


def test_token_logps_of_padded_rows_equal_unpadded_forward(tiny_pair):
    # Independent of the position-id convention: each row alone, with no padding at all.
    model = tiny_pair[0]
    mb = make_micro_batch([p for p, _ in ROWS], [c for _, c in ROWS], [0, 1, 2], pad_id=256)
    with torch.no_grad():
        logp, _ = token_logps(model, mb)
        for i, (p, c) in enumerate(ROWS):
            ids = torch.tensor([p + c])
            lp = torch.log_softmax(model(ids).logits[0, len(p) - 1 : -1].float(), -1)  # [len(c), V]
            ref = lp.gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
            torch.testing.assert_close(logp[i, : len(c)], ref, atol=1e-5, rtol=0)


def test_token_logps_gradient_flows(tiny):
    model = tiny[0]
    mb = make_micro_batch([p for p, _ in ROWS], [c for _, c in ROWS], [0, 1, 2], pad_id=256)
    logp, ent = token_logps(model, mb)
    assert ent is None
    logp.sum().backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_grouped_micro_batch_layout():
    mb = make_grouped_micro_batch(
        [[5, 6, 7], [8]], [[1], [2, 3], [4], []], index=[0, 1, 2, 3], group_size=2, pad_id=0
    )
    # each prompt once, left-padded to P = 3; the full rows repeat it per sample
    assert mb.prompt_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mb.prompt_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert mb.input_ids.tolist() == [[5, 6, 7, 1, 0], [5, 6, 7, 2, 3], [0, 0, 8, 4, 0], [0, 0, 8, 0, 0]]
    assert mb.mask.tolist() == [[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 0.0]]


def _assert_same_logps_and_gradients(model, a, b, grouped):
    """``a``: log-probs of the full rows (graph kept), ``b``: of the grouped micro-batch; both
    and the parameters' gradients of their sums must agree (fp32)."""
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    model.zero_grad()
    a.sum().backward()
    g_full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    token_logps(model, grouped)[0].sum().backward()
    for g1, p in zip(g_full, model.parameters()):
        torch.testing.assert_close(g1, p.grad, atol=1e-5, rtol=1e-4)


def test_grouped_logps_and_gradients_equal_the_full_rows(tiny):
    """Running a group's prompt once and repeating its keys/values gives the same log-probs and
    the same gradients as running every row in full (fp32)."""
    model, _ = tiny
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]  # different lengths: the second is left-padded
    comps = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [11], [12, 13]]
    rows = list(range(6))
    full = make_micro_batch([prompts[i // 3] for i in rows], comps, rows, pad_id=0)
    grouped = make_grouped_micro_batch(prompts, comps, rows, group_size=3, pad_id=0)
    a, _ = token_logps(model, full)
    b, _ = token_logps(model, grouped)
    _assert_same_logps_and_gradients(model, a, b, grouped)


def test_a_prefix_shared_by_all_prompts_runs_once_with_the_same_logps_and_gradients(tiny, monkeypatch):
    """Three prompts that share a 20-token prefix (a system prompt, say) and have tails of 3,
    1 and 5 tokens: the prefix runs once on one row, the tails against it, and the log-probs
    and gradients equal running every row in full (fp32)."""
    import thinkrl.rollout.base as rollout  # where shared_prefix_len reads MIN_SHARED_PREFIX

    model, _ = tiny
    prefix = list(range(30, 50))  # 20 tokens >= MIN_SHARED_PREFIX
    prompts = [prefix + [5, 6, 7], prefix + [8], prefix + [9, 10, 11, 12, 13]]
    comps = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [11], [12, 13]]
    rows = list(range(6))
    full = make_micro_batch([prompts[i // 2] for i in rows], comps, rows, pad_id=0)
    grouped = make_grouped_micro_batch(prompts, comps, rows, group_size=2, pad_id=0)
    calls = []
    inner = model.model
    real = inner.forward
    monkeypatch.setattr(inner, "forward", lambda *a, **k: calls.append(k["input_ids"].shape) or real(*a, **k))
    a, _ = token_logps(model, full)
    calls.clear()
    b, _ = token_logps(model, grouped)
    assert calls[:2] == [(1, 20), (3, 5)]  # the shared prefix once, then the three tails (padded to 5)
    assert rollout.MIN_SHARED_PREFIX <= 20
    _assert_same_logps_and_gradients(model, a, b, grouped)


def test_packed_completions_give_the_logps_and_gradients_of_the_full_rows(tiny, monkeypatch):
    """The completions of a grouped micro-batch run packed, in one pass of their 14 input
    tokens (each row's but its last); the log-probs and gradients equal those of the full
    rows, which a model that cannot pack runs (fp32)."""
    import thinkrl.trainer.batch as batch

    model, _ = tiny
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    comps = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10, 11, 12, 13], [11], [12, 13, 14, 15, 16, 17]]
    mb = make_grouped_micro_batch(prompts, comps, list(range(6)), group_size=3, pad_id=0)
    shapes = []
    inner = model.model
    real = inner.forward
    monkeypatch.setattr(
        inner, "forward", lambda *a, **k: shapes.append(tuple(k["input_ids"].shape)) or real(*a, **k)
    )
    weights = torch.arange(1.0, 8.0)  # unequal weights per position
    results = []
    for packs in (True, False):
        monkeypatch.setattr(batch, "packable", lambda config, packs=packs: packs)
        shapes.clear()
        model.zero_grad()
        logp, _ = token_logps(model, mb)  # [6, 7]
        (logp * weights).sum().backward()
        results.append((logp.detach(), [p.grad.clone() for p in model.parameters()], list(shapes)))
    (a, ga, calls_packed), (b, gb, calls_full) = results
    assert calls_packed == [(2, 5), (1, 14)]  # the prompts, then every completion in one packed row
    assert calls_full == [(6, 12)]  # every row in full: prompt 5 + completion 7
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a[2, 1:] == 0).all() and (a[3] != 0).all()
    for g1, g2 in zip(ga, gb):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)
    assert max(g.abs().max() for g in ga) > 1e-3  # not a comparison of zeros


def test_a_model_whose_layers_skip_the_packed_attention_is_refused(tiny, monkeypatch):
    """If a layer never calls the packed attention (a model that picks its attention some other
    way), its output would be wrong; the pass says so instead."""
    import thinkrl.trainer.batch as batch

    model, _ = tiny
    real = batch._packed_attention

    def first_layer_only(module, *a, thinkrl_packed=None, **k):
        out = real(module, *a, thinkrl_packed=thinkrl_packed, **k)
        if module.layer_idx > 0:
            thinkrl_packed["layers"].discard(module.layer_idx)
        return out

    monkeypatch.setattr(batch, "_packed_attention", first_layer_only)
    mb = make_grouped_micro_batch([[5, 6, 7]], [[1, 2, 3], [4, 5]], [0, 1], group_size=2, pad_id=0)
    with pytest.raises(RuntimeError, match="1 of 2 layers ran the packed attention"):
        token_logps(model, mb)
    assert model.model.config._attn_implementation != batch.PACKED_ATTENTION  # restored


def test_split_grouped_micro_batches_keeps_groups_whole():
    prompts = [[1, 2]] * 2 + [[3]] * 2 + [[4, 5, 6]] * 2  # 3 groups of G = 2
    comps = [[7], [7, 7], [8], [8], [9, 9, 9], [9]]
    mbs = split_grouped_micro_batches(prompts, comps, groups=[0, 2], group_size=2, size=2, pad_id=0)
    # one group per micro-batch (size // G = 1); sorted by prompt + longest completion: g0 (4) < g2 (6)
    assert [mb.index.tolist() for mb in mbs] == [[0, 1], [4, 5]]


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_gives_the_same_logps_and_gradients(tiny, lora):
    """Checkpointed layers drop the KV cache in training mode, so a grouped micro-batch runs its
    full rows instead; log-probs and gradients match the grouped pass without checkpointing (fp32).
    With LoRA (B made non-zero) the trainable parameters are the adapters."""
    import copy

    from thinkrl.config import LoraConfig
    from thinkrl.trainer.common import apply_lora, enable_gradient_checkpointing

    model, _ = tiny
    plain, ckpt = model, copy.deepcopy(model)
    enable_gradient_checkpointing(ckpt)
    if lora:
        plain, ckpt = apply_lora(plain, LoraConfig(enabled=True)), apply_lora(ckpt, LoraConfig(enabled=True))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
                if "lora_" in name:
                    b.copy_(a.copy_(torch.randn(a.shape, generator=g) * 0.3))
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    comps = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [11], [12, 13]]
    mb = make_grouped_micro_batch(prompts, comps, list(range(6)), group_size=3, pad_id=0)
    attn0 = (
        (ckpt.get_base_model() if lora else ckpt).model.layers[0].self_attn
    )  # called inside the checkpoint
    calls = []
    attn0.register_forward_hook(lambda *_: calls.append(1))
    results = []
    for m in (plain.train(), ckpt.train()):
        logp, _ = token_logps(m, mb)  # [6, 4]
        (logp * torch.arange(1.0, 5.0)).sum().backward()  # unequal weights per position
        results.append((logp.detach(), {n: q.grad for n, q in m.named_parameters() if q.requires_grad}))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert ga.keys() == gb.keys() and all(("lora_" in n) == lora for n in ga)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], atol=1e-5, rtol=1e-4)
    assert any(g.abs().max() > 1e-3 for g in ga.values())  # not a comparison of zeros
    assert len(calls) == 2  # one full-row forward, recomputed once in backward: checkpointing was on


def test_fill_rows_places_each_micro_batch_at_its_rows():
    # rows 3 and 1 (T' = 3), then row 0 (T' = 2) of an [N=4, T=4] tensor; row 2 is in none
    mbs = [
        make_micro_batch([[5], [8]], [[1, 2, 3], [4, 5, 6]], index=[3, 1], pad_id=0),
        make_micro_batch([[5]], [[7, 8]], index=[0], pad_id=0),
    ]
    out = fill_rows(mbs, 4, 4, lambda mb: mb.input_ids[:, mb.prompt_len :].float() * mb.mask)
    assert out.tolist() == [[7, 8, 0, 0], [4, 5, 6, 0], [0, 0, 0, 0], [1, 2, 3, 0]]
