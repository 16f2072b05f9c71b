"""The chunked LM-head log-prob/entropy function against plain autograd."""

import pytest
import torch

from thinkrl.trainer.batch import HeadLogProbs, make_micro_batch, token_logps


def reference(h, W, y, t):
    logp_all = torch.log_softmax((h @ W.T) / t, -1)  # [n, V]
    return logp_all.gather(-1, y[:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)


@pytest.mark.parametrize("t", [1.0, 0.7])
def test_values_and_gradients_match_plain_autograd(t, monkeypatch):
    monkeypatch.setattr(HeadLogProbs, "CHUNK", 10)  # 37 rows: four chunks, the last one short
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    W = torch.randn(50, 16, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (37,), generator=g)
    a, b = torch.randn(37, generator=g), torch.randn(37, generator=g)
    lp, ent = HeadLogProbs.apply(h, W, y, t, False, True)
    rlp, rent = reference(h, W, y, t)
    torch.testing.assert_close(lp, rlp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, rent, atol=1e-5, rtol=0)
    got = torch.autograd.grad((lp * a).sum() + (ent * b).sum(), [h, W])
    want = torch.autograd.grad((rlp * a).sum() + (rent * b).sum(), [h, W])
    for x, y_ in zip(got, want):
        torch.testing.assert_close(x, y_, atol=1e-4, rtol=1e-4)


def test_token_logps_equals_the_full_logits_computation(tiny_pair):
    model, tok = tiny_pair
    prompts = [[5, 6, 7], [8, 9]]
    comps = [[10, 11, 12, 13], [14]]
    mb = make_micro_batch(prompts, comps, [0, 1], tok.pad_token_id)
    logp, ent = token_logps(model, mb, temperature=0.9, with_entropy=True)
    with torch.no_grad():
        for r, (p, c) in enumerate(zip(prompts, comps)):
            logits = (
                model(torch.tensor([p + c])).logits[0, len(p) - 1 : len(p) + len(c) - 1] / 0.9
            )  # [len c, V]
            lsm = torch.log_softmax(logits, -1)
            torch.testing.assert_close(
                logp[r, : len(c)], lsm.gather(-1, torch.tensor(c)[:, None]).squeeze(-1), atol=1e-5, rtol=0
            )
            torch.testing.assert_close(ent[r, : len(c)], -(lsm.exp() * lsm).sum(-1), atol=1e-5, rtol=0)
    assert logp[1, 1:].abs().sum() == 0 and ent[1, 1:].abs().sum() == 0  # padding stays zero
