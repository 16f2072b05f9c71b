import pytest
import torch

from thinkrl.trainer.batch import make_micro_batch, split_micro_batches, token_logps


def test_make_micro_batch_layout():
    mb = make_micro_batch([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], index=[3, 1], pad_id=0)
    # P = 3, T = 3: prompts left-padded to 3, completions right-padded to 3
    assert mb.prompt_len == 3
    assert mb.input_ids.tolist() == [[5, 6, 7, 1, 2, 0],
                                     [0, 0, 8, 3, 4, 9]]
    assert mb.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0],
                                          [0, 0, 1, 1, 1, 1]]
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
        logits = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask,
                       position_ids=positions).logits[:, P - 1: P - 1 + T] / temperature  # [b, T, V]
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
            lp = torch.log_softmax(model(ids).logits[0, len(p) - 1: -1].float(), -1)  # [len(c), V]
            ref = lp.gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
            torch.testing.assert_close(logp[i, : len(c)], ref, atol=1e-5, rtol=0)


def test_token_logps_gradient_flows(tiny):
    model = tiny[0]
    mb = make_micro_batch([p for p, _ in ROWS], [c for _, c in ROWS], [0, 1, 2], pad_id=256)
    logp, ent = token_logps(model, mb)
    assert ent is None
    logp.sum().backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
