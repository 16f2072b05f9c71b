"""Thinking budgets: the bookkeeping worked by hand, then both engines on tiny-random."""

import copy

import pytest
import torch

from thinkrl.config import ConfigError
from thinkrl.rollout import HFEngine, SamplingParams
from thinkrl.rollout.fast import FastEngine
from thinkrl.rollout.thinking import (
    CLOSING_PHRASE,
    FORCING,
    THINKING,
    WAIT_PHRASE,
    BudgetTracker,
    close_start_ids,
    closing_ids,
    thinking_open,
    wait_ids,
)
from thinkrl.trainer.batch import make_micro_batch, token_logps

QUESTIONS = ["What is 2 + 3?", "Name a colour.", "Tell me a story about a cat"]


@pytest.fixture
def shaken(tiny_pair, shake):
    """tiny-random with its weights shaken, so greedy text is not one repeated token."""
    model, tok = tiny_pair
    model = copy.deepcopy(model)
    return shake(model), tok


def thinking_prompt(tok, q):
    """A chat prompt whose assistant turn starts with <think> (as the default task's prefill)."""
    return (
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        + "<think>"
    )


# -- the bookkeeping -----------------------------------------------------------------------


def test_thinking_open_reads_the_last_tag_of_the_prompt():
    assert thinking_open("Assistant: <think>")
    assert thinking_open("Use <think> </think> tags. Assistant: <think>")  # R1-Zero's template
    assert not thinking_open("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # Qwen3, enable_thinking=False
    assert not thinking_open("<|im_start|>assistant\n")


def test_tracker_counts_tokens_after_a_generated_opening_then_forces_the_phrase(tiny_pair):
    """Byte tokens (tiny-random has no single token for the tags): "ok <think>" opens the
    thinking at its last byte ">"; with a budget of 3, "a", "b", "c" are the 3 thinking tokens,
    and then the phrase's tokens are due one by one, then nothing."""
    tok = tiny_pair[1]
    phrase = closing_ids(tok)
    assert tok.decode(phrase) == CLOSING_PHRASE and len(phrase) == len(
        CLOSING_PHRASE.encode()
    )  # one id per byte
    tr = BudgetTracker(tok, 3, ["<|im_start|>assistant\n"], phrase)
    toks = []
    for ch in "ok <think>abc":
        assert tr.next_forced(0) is None
        toks += tok(ch, add_special_tokens=False).input_ids
        tr.observe(0, toks)
    assert tr.phase[0] == FORCING
    for want in phrase:
        assert tr.next_forced(0) == want
        toks.append(want)
        tr.observe(0, toks)
    assert tr.next_forced(0) is None
    assert tr.forced[0] == [False] * len("ok <think>abc") + [True] * len(phrase)


def test_tracker_leaves_a_thinking_that_closes_within_the_budget_alone(tiny_pair):
    tok = tiny_pair[1]
    tr = BudgetTracker(tok, 12, ["Assistant: <think>"], closing_ids(tok))
    assert tr.phase[0] == THINKING  # opened by the prompt
    toks = []
    for ch in "x</think>" + "y" * 20:  # 9 tokens of thinking including the tag, then 20 of answer
        toks += tok(ch, add_special_tokens=False).input_ids
        tr.observe(0, toks)
        assert tr.next_forced(0) is None
    assert not any(tr.forced[0])


def test_a_budget_of_zero_forces_the_phrase_at_once(tiny_pair):
    tok = tiny_pair[1]
    phrase = closing_ids(tok)
    tr = BudgetTracker(tok, 0, ["Assistant: <think>", "Assistant:"], phrase)
    assert tr.next_forced(0) == phrase[0] and tr.next_forced(1) is None


@pytest.mark.parametrize("bad", [-1, 2.5, "64", True])
def test_a_bad_budget_is_one_config_error(bad):
    with pytest.raises(ConfigError, match="thinking_budget must be a whole number of tokens >= 0"):
        SamplingParams(thinking_budget=bad)


# -- the engines -----------------------------------------------------------------------------


def test_fast_engine_caps_thinking_at_the_budget(shaken):
    """Greedy, budget 8: each completion is the unbudgeted one's first 8 tokens, then exactly
    the closing phrase (marked forced, nothing else is), then the model's own answer."""
    model, tok = shaken
    prompts = [thinking_prompt(tok, q) for q in QUESTIONS]
    phrase, B = closing_ids(tok), 8
    eng = FastEngine(model, tok, bf16=False)
    free = eng.generate_text(prompts, 1, SamplingParams(max_new_tokens=140, temperature=0))
    capped = eng.generate_text(
        prompts, 1, SamplingParams(max_new_tokens=140, temperature=0, thinking_budget=B)
    )
    assert free.forced is None
    for f, c, mask, text in zip(free.completion_ids, capped.completion_ids, capped.forced, capped.texts):
        assert len(f) > B and "</think>" not in tok.decode(f[:B])  # the free run thinks past the budget
        assert c[:B] == f[:B]
        assert c[B : B + len(phrase)] == phrase
        assert mask == [False] * B + [True] * len(phrase) + [False] * (len(c) - B - len(phrase))
        assert text.count(CLOSING_PHRASE) == 1
    assert any(len(c) > B + len(phrase) for c in capped.completion_ids)  # the model answered after it


def test_hf_engine_gives_the_fast_engines_budgeted_tokens(shaken):
    """The hf engine enforces the budget with a logits processor: greedy tokens and forced masks
    identical to the fast engine's, for a budget that cuts in (8) and for 0."""
    model, tok = shaken
    prompts = [thinking_prompt(tok, q) for q in QUESTIONS]
    for B in (8, 0):
        params = SamplingParams(max_new_tokens=130, temperature=0, thinking_budget=B)
        ref = HFEngine(model, tok, bf16=False, batch_size=2).generate_text(prompts, 1, params)  # two batches
        got = FastEngine(model, tok, bf16=False).generate_text(prompts, 1, params)
        assert got.completion_ids == ref.completion_ids
        assert got.forced == ref.forced
        assert all(sum(m) == len(closing_ids(tok)) for m in ref.forced)


def test_forced_tokens_logps_are_the_models(shaken):
    """Sampled at temperature 0.7 with a budget of 5: the log-probs the engine reports, forced
    tokens included, equal the training forward's for the same tokens."""
    model, tok = shaken
    prompts = [thinking_prompt(tok, q) for q in QUESTIONS]
    torch.manual_seed(0)
    ro = FastEngine(model, tok, bf16=False).generate_text(
        prompts, 2, SamplingParams(max_new_tokens=120, temperature=0.7, thinking_budget=5)
    )
    assert sum(map(sum, ro.forced)) >= len(closing_ids(tok))  # at least one row was forced
    mb = make_micro_batch(ro.prompt_ids, ro.completion_ids, list(range(len(ro.prompt_ids))), tok.pad_token_id)
    with torch.no_grad():
        logp, _ = token_logps(model, mb, temperature=0.7)
    T = mb.mask.shape[1]
    engine = torch.tensor([x + [0.0] * (T - len(x)) for x in ro.logps])
    torch.testing.assert_close(engine * mb.mask, logp, atol=1e-4, rtol=0)
    forced = torch.tensor([m + [False] * (T - len(m)) for m in ro.forced])
    assert (logp[forced] < 0).all()  # real log-probs, not a placeholder 0


@pytest.mark.parametrize("engine", ["fast", "hf"])
def test_a_budget_that_never_binds_changes_nothing(shaken, engine):
    """Sampling with a budget above max_new_tokens, or on a prompt that does not think, draws
    the same tokens (and log-probs) from the same seed as with no budget; a budget that binds
    does change them (so the comparison can fail)."""
    model, tok = shaken
    eng = (FastEngine if engine == "fast" else HFEngine)(model, tok, bf16=False)

    def sample(prompts, budget):
        torch.manual_seed(4)
        return eng.generate_text(
            prompts, 3, SamplingParams(max_new_tokens=30, temperature=1.0, thinking_budget=budget)
        )

    thinking = [thinking_prompt(tok, QUESTIONS[0])]
    plain = [thinking_prompt(tok, QUESTIONS[1]).removesuffix("<think>")]
    none, big, small = sample(thinking, None), sample(thinking, 100), sample(thinking, 2)
    assert big.completion_ids == none.completion_ids and big.logps == none.logps
    assert big.forced == [[False] * len(c) for c in big.completion_ids]
    assert small.completion_ids != none.completion_ids
    free, capped = sample(plain, None), sample(plain, 2)
    assert capped.completion_ids == free.completion_ids and not any(map(any, capped.forced))


def test_qwen3_single_token_tags_and_its_no_thinking_prompt(tmp_path):
    """A tiny Qwen3, whose tokenizer has one id for </think> (so the phrase ends the block with
    that token): budget 4 caps a thinking prompt the same way in both engines, and Qwen3's
    enable_thinking=False prompt (an empty, closed block) is left alone."""
    from thinkrl.models import build_tiny_model, load_model

    build_tiny_model(tmp_path, "qwen3")
    model, tok = load_model(str(tmp_path))
    phrase = closing_ids(tok)
    assert tok.convert_tokens_to_ids("</think>") in phrase
    msgs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    think = [
        tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) + "<think>\n" for m in msgs
    ]
    nothink = [
        tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        for m in msgs
    ]
    params = SamplingParams(max_new_tokens=len(phrase) + 12, temperature=0, thinking_budget=4)
    got = FastEngine(model, tok, bf16=False).generate_text(think + nothink, 1, params)
    ref = HFEngine(model, tok, bf16=False).generate_text(think + nothink, 1, params)
    assert got.completion_ids == ref.completion_ids and got.forced == ref.forced
    for c, mask in zip(got.completion_ids[:3], got.forced[:3]):
        assert c[4 : 4 + len(phrase)] == phrase and mask[: 4 + len(phrase)] == [False] * 4 + [True] * len(
            phrase
        )
    free = FastEngine(model, tok, bf16=False).generate_text(
        nothink, 1, SamplingParams(max_new_tokens=len(phrase) + 12, temperature=0)
    )
    assert got.completion_ids[3:] == free.completion_ids and not any(map(any, got.forced[3:]))


# -- the "Wait" extension (s1): a minimum of thinking tokens --------------------------------


def test_close_start_tokens_and_the_wait_phrase(tiny_pair):
    """tiny-random's tokens are bytes: every spelling of </think> starts with the byte "<"."""
    tok = tiny_pair[1]
    assert close_start_ids(tok) == tok("<", add_special_tokens=False).input_ids
    assert tok.decode(wait_ids(tok)) == WAIT_PHRASE


def test_tracker_writes_wait_where_the_model_would_close_too_early(tiny_pair):
    """min_thinking=8, no cap. Thought tokens "ab" (2), then the logits' argmax is "<": the
    phrase " Wait," (6 bytes) is forced, which brings the count to 8; the next "<" is allowed."""
    tok = tiny_pair[1]
    lt = tok("<", add_special_tokens=False).input_ids[0]
    V = len(tok)
    closing, wait = closing_ids(tok), wait_ids(tok)
    tr = BudgetTracker(tok, None, ["<think>"], closing, min_thinking=8, wait=wait, close_starts=[lt])
    wants_close, other = torch.zeros(V), torch.zeros(V)
    wants_close[lt], other[lt + 1] = 1.0, 1.0
    toks = []
    for ch in "ab":
        assert tr.next_forced(0, other) is None and tr.must_think(0)
        toks += tok(ch, add_special_tokens=False).input_ids
        tr.observe(0, toks)
    for want in wait:
        assert tr.next_forced(0, wants_close) == want
        toks.append(want)
        tr.observe(0, toks)
    assert tr.phase[0] == THINKING and tr.thought[0] == 8 and tr.waits[0] == 1
    assert not tr.must_think(0) and tr.next_forced(0, wants_close) is None
    assert tr.forced[0] == [False, False] + [True] * len(wait)


def test_a_bad_minimum_is_one_config_error():
    with pytest.raises(ConfigError, match="min_thinking"):
        SamplingParams(min_thinking=-1)


def test_both_engines_keep_thinking_until_the_minimum(shaken, monkeypatch):
    """Every token but the bytes of " Wait," counts as a closing tag's start here (patched), so
    under the minimum a row either has " Wait," forced (the argmax is a "closing" token) or
    may only sample the phrase's bytes: its first 12 thinking tokens are all such bytes, the
    first 6 the forced phrase. Both engines give the same tokens and masks."""
    import thinkrl.rollout.thinking as thinking

    model, tok = shaken
    wait = wait_ids(tok)
    monkeypatch.setattr(thinking, "close_start_ids", lambda t: [i for i in range(len(t)) if i not in wait])
    prompts = [thinking_prompt(tok, q) for q in QUESTIONS]
    params = SamplingParams(max_new_tokens=16, temperature=0, min_thinking=12)
    ro = {
        name: cls(model, tok, bf16=False).generate_text(prompts, 1, params)
        for name, cls in (("fast", FastEngine), ("hf", HFEngine))
    }
    for c, f in zip(ro["fast"].completion_ids, ro["fast"].forced):
        assert c[:6] == wait and f[:6] == [True] * 6
        assert set(c[:12]) <= set(wait)
    assert ro["fast"].completion_ids == ro["hf"].completion_ids and ro["fast"].forced == ro["hf"].forced
