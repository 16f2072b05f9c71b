"""The text side of serving, without a server: thinking split, stop hold-back, incremental decoding."""

import random

import pytest

from thinkrl.serve.scheduler import Scheduler, Sequence, _held_back
from thinkrl.serve.split import ThinkSplitter, split


def feed_all(pieces, opened):
    s, r, c = ThinkSplitter(opened), "", ""
    for i, p in enumerate(pieces):
        a, b = s.feed(p, final=i == len(pieces) - 1)
        r, c = r + a, c + b
    return r, c


@pytest.mark.parametrize(
    "text, opened, want",
    [
        ("<think>\nplan</think>\n\nanswer", False, ("plan", "answer")),  # the reply opens the block itself
        ("plan\n</think>\n\n42", True, ("plan\n", "42")),  # the prompt opened it
        ("no thinking here", False, ("", "no thinking here")),
        ("  <think>x", False, ("x", "")),  # cut off while thinking: all reasoning
        ("<thin", False, ("", "<thin")),  # not a tag after all
        ("a < b </think> c", True, ("a < b ", "c")),
    ],
)
def test_split_by_hand(text, opened, want):
    assert split(text, opened) == want
    # fed one character at a time, the pieces add up to the same split, and no piece holds half a tag
    s, r, c = ThinkSplitter(opened), [], []
    for i, ch in enumerate(text):
        a, b = s.feed(ch, final=i == len(text) - 1)
        r.append(a)
        c.append(b)
    assert ("".join(r), "".join(c)) == want
    assert not any(p in ("<", "</", "</think") for p in r + c if p)


def test_held_back_covers_partial_stops_and_characters():
    assert _held_back("hello wor", ("world",)) == 3  # "wor" may become "world"
    assert _held_back("hello", ("xyz",)) == 0
    assert _held_back("ab\ufffd", ()) == 1  # an incomplete UTF-8 character


def test_incremental_decoding_equals_decoding_everything(tiny_pair):
    """Random token streams (byte tokens that often split UTF-8 characters, specials among
    them): the text built piece by piece is the whole sequence's decode."""
    _, tok = tiny_pair
    rng = random.Random(0)
    sched = Scheduler.__new__(Scheduler)
    sched.tok = tok
    for _ in range(20):
        seq = Sequence(ids=[1], params=None)
        toks = [
            rng.choice([rng.randrange(256), rng.randrange(256), 0xC3 % 256, tok.eos_token_id])
            for _ in range(rng.randrange(1, 40))
        ]
        for i, t in enumerate(toks):
            seq.tokens.append(t)
            sched._decode(seq, flush=i == len(toks) - 1)
        assert seq.text == tok.decode(toks, skip_special_tokens=True)
