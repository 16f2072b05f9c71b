"""The slot decoder (continuous batching) against HF ``generate`` and against itself."""

import copy

import pytest
import torch

from thinkrl.rollout import HFEngine, SamplingParams
from thinkrl.rollout.slots import SequenceTooLong, SlotDecoder, SlotsFull
from thinkrl.rollout.thinking import CLOSING_PHRASE

PROMPTS = ["What is 2 + 3?", "Name a colour.", "Tell me a story about a cat"]  # three lengths


@pytest.fixture(scope="module")
def lively(shake):
    """tiny-random with its weights shaken, so greedy text is not one repeated token."""
    from thinkrl.models import load_model

    model, tok = load_model("tiny-random")
    model = copy.deepcopy(model)
    return shake(model), tok


def chat(tok, q):
    return tok.apply_chat_template(
        [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
    )


def ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def run_to_end(dec, slots):
    """Step until every slot in ``slots`` finished; their emitted tokens."""
    out = {s: [] for s in slots}
    while not all(dec.finished(s) for s in slots):
        for e in dec.step():
            if e.slot in out:
                out[e.slot].append(e.token)
    return out


def test_staggered_greedy_slots_equal_hf_generate(lively):
    """Requests join a running batch at different steps and leave when done; each one's
    greedy tokens are still exactly HF generate's on that prompt alone."""
    model, tok = lively
    prompts = [chat(tok, q) for q in PROMPTS]
    params = SamplingParams(max_new_tokens=20, temperature=0)
    ref = HFEngine(model, tok, bf16=False).generate_text(prompts, 1, params).completion_ids
    assert len({tuple(c) for c in ref}) > 1  # the outputs differ per prompt: a real check
    dec = SlotDecoder(model, tok, max_slots=4, max_len=128)
    got = {}
    a = dec.add(ids(tok, prompts[0]), params)
    for _ in range(3):  # slot a runs alone for 3 steps
        got.setdefault(a, []).extend(e.token for e in dec.step())
    b = dec.add(ids(tok, prompts[1]), params)
    for _ in range(5):
        for e in dec.step():
            got.setdefault(e.slot, []).append(e.token)
    c = dec.add(ids(tok, prompts[2]), params)
    rest = run_to_end(dec, [a, b, c])
    for s in (a, b, c):
        got.setdefault(s, []).extend(rest[s])
    assert [got[a], got[b], got[c]] == ref


def test_free_moves_rows_and_keeps_other_slots_exact(lively):
    """Freeing a slot in the middle moves the last row into its place; the moved slot's
    continuation is unchanged (equal to decoding it alone)."""
    model, tok = lively
    params = SamplingParams(max_new_tokens=16, temperature=0)
    alone = SlotDecoder(model, tok, max_slots=1, max_len=96)
    s = alone.add(ids(tok, chat(tok, PROMPTS[2])), params)
    want = run_to_end(alone, [s])[s]
    dec = SlotDecoder(model, tok, max_slots=3, max_len=96)
    first = dec.add(ids(tok, chat(tok, PROMPTS[0])), params)
    mid = dec.add(ids(tok, chat(tok, PROMPTS[1])), params)
    last = dec.add(ids(tok, chat(tok, PROMPTS[2])), params)
    got = [e.token for e in dec.step() if e.slot == last]
    dec.free(first)  # row 0 freed: `last` moves from row 2 to row 0
    assert dec.active == 2 and dec._row[last] == 0 and dec._row[mid] == 1
    got += run_to_end(dec, [last])[last]
    assert got == want
    dec.free(mid)
    dec.free(last)
    assert dec.active == 0 and dec.free_slots == 3


def test_extend_equals_prefilling_the_whole_history(lively):
    """A second turn appended with extend continues exactly as a fresh prefill of the whole
    conversation (turn 1, its answer, turn 2) would."""
    model, tok = lively
    params = SamplingParams(max_new_tokens=8, temperature=0)
    dec = SlotDecoder(model, tok, max_slots=2, max_len=160)
    turn1 = ids(tok, chat(tok, PROMPTS[0]))
    s = dec.add(turn1, params)
    answer = run_to_end(dec, [s])[s]
    obs = ids(tok, "\n<obs>42</obs>\n")
    dec.extend(s, obs)
    assert dec.length(s) == len(turn1) + len(answer) + len(obs)
    cont = run_to_end(dec, [s])[s]
    fresh = SlotDecoder(model, tok, max_slots=1, max_len=160)
    f = fresh.add(turn1 + answer + obs, params)
    assert run_to_end(fresh, [f])[f] == cont
    assert dec._next[dec._row[s]].allclose(fresh._next[0], atol=1e-4)


def test_sampled_logps_match_log_softmax(lively):
    """A sampled token's reported log-prob is log softmax(logits / T) of the prompt's
    last position (worked out here with the HF model)."""
    model, tok = lively
    dec = SlotDecoder(model, tok, max_slots=1, max_len=64)
    prompt = ids(tok, chat(tok, PROMPTS[1]))
    s = dec.add(prompt, SamplingParams(max_new_tokens=4, temperature=0.7), seed=3)
    e = dec.step()[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1]
    want = torch.log_softmax(logits / 0.7, -1)[e.token]
    assert e.logp == pytest.approx(float(want), abs=1e-4)
    dec.free(s)


def test_seeded_slots_do_not_depend_on_the_batch(lively):
    """A seeded request samples the same tokens whether it runs alone or beside others."""
    model, tok = lively
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    prompt = ids(tok, chat(tok, PROMPTS[0]))
    alone = SlotDecoder(model, tok, max_slots=1, max_len=64)
    s = alone.add(prompt, params, seed=7)
    want = run_to_end(alone, [s])[s]
    dec = SlotDecoder(model, tok, max_slots=3, max_len=64)
    dec.add(ids(tok, chat(tok, PROMPTS[1])), params)
    t = dec.add(prompt, params, seed=7)
    dec.add(ids(tok, chat(tok, PROMPTS[2])), params)
    assert run_to_end(dec, [t])[t] == want
    other = SlotDecoder(model, tok, max_slots=1, max_len=64)
    u = other.add(prompt, params, seed=8)
    assert run_to_end(other, [u])[u] != want  # another seed, another sample: the seed is used


def test_thinking_budget_forces_the_closing_phrase(lively):
    """With budget B and a prompt that opened <think>, tokens B+1.. are the closing phrase,
    marked forced."""
    model, tok = lively
    phrase = ids(tok, CLOSING_PHRASE)
    prompt = chat(tok, PROMPTS[0]) + "<think>\n"
    dec = SlotDecoder(model, tok, max_slots=1, max_len=256)
    s = dec.add(
        ids(tok, prompt),
        SamplingParams(max_new_tokens=3 + len(phrase) + 2, temperature=0, thinking_budget=3),
        prompt_text=prompt,
    )
    em = []
    while not dec.finished(s):
        em += dec.step()
    toks = [e.token for e in em]
    if any(t in dec.eos_ids for t in toks[:3]):
        pytest.skip("the model ended before its budget")
    assert toks[3 : 3 + len(phrase)] == phrase
    assert [e.forced for e in em[: 3 + len(phrase)]] == [False] * 3 + [True] * len(phrase)
    assert dec.forced(s) == [e.forced for e in em] and dec.generated(s) == toks


def test_full_slots_and_too_long_prompts_are_refused(lively):
    model, tok = lively
    dec = SlotDecoder(model, tok, max_slots=1, max_len=16)
    with pytest.raises(SequenceTooLong):
        dec.add(list(range(5, 22)))  # 17 tokens > 16
    s = dec.add([5, 6, 7], SamplingParams(max_new_tokens=100, temperature=0))
    with pytest.raises(SlotsFull):
        dec.add([5, 6])
    em = []
    while not dec.finished(s):
        em += dec.step()
    assert len(em) <= 13 and (em[-1].reason == "stop" or dec.length(s) == 16)  # the cache bounds the length
    dec.free(s)
    assert dec.active == 0


def test_hf_fallback_decoder_equals_hf_generate_and_serves_one_at_a_time(lively):
    """The serial fallback (for models the fast engine cannot run) gives generate's greedy
    tokens and its top log-probs rank the chosen token first."""
    from thinkrl.rollout.slots import HFSlotDecoder

    model, tok = lively
    prompts = [chat(tok, q) for q in PROMPTS[:2]]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    ref = HFEngine(model, tok, bf16=False).generate_text(prompts, 1, params).completion_ids
    dec = HFSlotDecoder(model, tok, max_len=128)
    for p, want in zip(prompts, ref):
        s = dec.add(ids(tok, p), params, top_logprobs=3)
        with pytest.raises(SlotsFull):
            dec.add([5])
        em = []
        while not dec.finished(s):
            em += dec.step()
        assert [e.token for e in em] == want
        assert all(e.top[0][0] == e.token and e.top[0][1] == pytest.approx(e.logp, abs=1e-5) for e in em)
        dec.free(s)


def test_a_finished_slot_between_live_ones_keeps_the_others_exact(lively):
    """The middle slot finishes first and is kept (not freed): the step then gathers rows 0
    and 2; their tokens still equal decoding each prompt alone."""
    model, tok = lively
    long, short = (
        SamplingParams(max_new_tokens=10, temperature=0),
        SamplingParams(max_new_tokens=2, temperature=0),
    )
    want = []
    for q in (PROMPTS[0], PROMPTS[2]):
        alone = SlotDecoder(model, tok, max_slots=1, max_len=96)
        s = alone.add(ids(tok, chat(tok, q)), long)
        want.append(run_to_end(alone, [s])[s])
    dec = SlotDecoder(model, tok, max_slots=3, max_len=96)
    a = dec.add(ids(tok, chat(tok, PROMPTS[0])), long)
    m = dec.add(ids(tok, chat(tok, PROMPTS[1])), short)
    c = dec.add(ids(tok, chat(tok, PROMPTS[2])), long)
    got = run_to_end(dec, [a, m, c])
    assert dec.finished(m) and len(got[m]) <= 2 and dec.active == 3
    assert [got[a], got[c]] == want


@pytest.mark.parametrize(
    "extra",
    [
        dict(thinking_budget=6),
        dict(thinking_budget=40, min_thinking=30),
        dict(min_new_tokens=12, stop=(ord("a"),)),
    ],
)
def test_slot_equals_the_fast_engine_on_budgets_minimums_and_stops(lively, extra):
    """The same greedy tokens as the batch engine (FastEngine.generate) under a thinking
    budget, s1's minimum thinking, and min_new_tokens with a stop token."""
    from thinkrl.rollout.fast import FastEngine

    model, tok = lively
    prompts = [chat(tok, q) + "<think>\n" for q in PROMPTS]
    params = SamplingParams(max_new_tokens=40, temperature=0, **extra)
    ref = FastEngine(model, tok, bf16=False).generate_text(prompts, 1, params)
    dec = SlotDecoder(model, tok, max_slots=3, max_len=160)
    slots = [dec.add(ids(tok, p), params, prompt_text=p) for p in prompts]
    got = run_to_end(dec, slots)
    assert [got[s] for s in slots] == ref.completion_ids
    if ref.forced is not None:
        assert [dec.forced(s) for s in slots] == ref.forced
