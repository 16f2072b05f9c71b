"""Packed completions (thinkrl/rollout/packed.py): the layout, worked out by hand, and the
attention against a reference that attends each token on its own, in fp64."""

import pytest
import torch

from thinkrl.rollout.packed import pack_completions, packable


def _example():
    """Two groups of two rows, prompt length 3 (group 1's prompt has one padding slot).
    Completions: [1, 2, 3], [4], [5, 6], [7, 8, 9, 10] (right-padded with 0 to T = 4)."""
    c_ids = torch.tensor([[1, 2, 3, 0], [4, 0, 0, 0], [5, 6, 0, 0], [7, 8, 9, 10]])
    c_mask = c_ids > 0
    group = torch.tensor([0, 0, 1, 1])
    prompt_mask = torch.tensor([[True, True, True], [False, True, True]])
    start = torch.tensor([3, 3, 2, 2])  # each row's true prompt length
    return c_ids, c_mask, group, prompt_mask, start


def test_the_layout_of_a_packed_micro_batch():
    layout = pack_completions(*_example())
    # every token but a row's last is an input; row 1 has none
    assert layout.ids.tolist() == [1, 2, 5, 7, 8, 9]
    assert layout.pos.tolist() == [3, 4, 2, 2, 3, 4]
    assert layout.keep.tolist() == [
        [True, True, False],
        [False, False, False],
        [True, False, False],
        [True, True, True],
    ]
    (j0, a0, e0, m0), (j1, a1, e1, m1) = layout.spans
    assert (j0, a0, e0, j1, a1, e1) == (0, 0, 2, 1, 2, 6)
    # keys: [3 prompt slots | the group's packed tokens]; a token sees its own row up to itself
    assert m0.int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert m1.int().tolist() == [
        [0, 1, 1, 1, 0, 0, 0],  # row 2's token 0
        [0, 1, 1, 0, 1, 0, 0],  # row 3's tokens 0, 1, 2
        [0, 1, 1, 0, 1, 1, 0],
        [0, 1, 1, 0, 1, 1, 1],
    ]


def test_a_group_without_inputs_has_no_span_and_rows_must_come_in_group_order():
    c_ids, c_mask, group, prompt_mask, start = _example()
    c_ids[2:, 1:] = 0  # group 1's rows hold one token each: nothing to input
    layout = pack_completions(c_ids, c_ids > 0, group, prompt_mask, start)
    assert [s[:3] for s in layout.spans] == [(0, 0, 2)]
    with pytest.raises(ValueError, match="group order"):
        pack_completions(c_ids, c_mask, torch.tensor([1, 1, 0, 0]), prompt_mask, start)


@pytest.mark.parametrize("eager", [True, False])
def test_packed_attention_equals_each_token_attended_on_its_own(eager):
    """4 query heads over 2 key heads (head h reads key head h // 2), scale 0.3."""
    c_ids, c_mask, group, prompt_mask, start = _example()
    layout = pack_completions(c_ids, c_mask, group, prompt_mask, start)
    n, nh, nkv, hd, P = len(layout.ids), 4, 2, 8, 3
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, hd, generator=g) for h in (nh, nkv, nkv))
    pk, pv = (torch.randn(2, nkv, P, hd, generator=g) for _ in range(2))
    got = layout.attend(q, k, v, pk, pv, scale=0.3, eager=eager)

    rows = torch.arange(4)[:, None].expand(4, 3)[layout.keep].tolist()  # [n] row of each token
    want = torch.empty(1, nh, n, hd, dtype=torch.float64)
    for i in range(n):
        r = rows[i]
        own = [t for t in range(i + 1) if rows[t] == r]  # the row's tokens up to this one
        slots = [s for s in range(P) if prompt_mask[group[r], s]]
        for h in range(nh):
            kv_h = h // 2
            keys = torch.cat([pk[group[r], kv_h, slots], k[0, kv_h, own]]).double()
            vals = torch.cat([pv[group[r], kv_h, slots], v[0, kv_h, own]]).double()
            w = torch.softmax(keys @ q[0, h, i].double() * 0.3, 0)
            want[0, h, i] = w @ vals
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


def test_packable_models():
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    assert packable(LlamaConfig(**small)) and packable(Qwen2Config(**small))
    assert not packable(Qwen2Config(**small, use_sliding_window=True, sliding_window=8, max_window_layers=1))
    assert not packable(GPT2Config())
