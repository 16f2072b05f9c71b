"""Every registered rollout backend keeps the same protocol (thinkrl/rollout/__init__.py):
token ids in, the n samples of a prompt adjacent, sampled log-probs that the training
forward reproduces, per-call seeds, stop strings and ids, and an explicit weight sync.

The reference throughout is the model itself: HF ``generate`` on one unpadded prompt at a
time, and a plain teacher-forced forward pass."""

import copy

import pytest
import torch

from thinkrl.config import ConfigError
from thinkrl.rollout import ENGINES, SamplingParams, build_engine, build_scorer

QUESTIONS = ["What is 2 + 3?", "Name a colour.", "Tell me a story about a cat"]  # three lengths


def shaken(model, seed: int):
    """A copy of ``model`` with its weights moved, so greedy text is not one repeated token."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def lively(tiny_pair):
    model, tok = tiny_pair
    return shaken(model, 1), tok


@pytest.fixture(params=ENGINES.names())
def backend(request):
    return request.param


def prompt_ids(tok) -> list[list[int]]:
    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in QUESTIONS
    ]
    return [tok(t, add_special_tokens=False).input_ids for t in texts]


def hf_greedy(model, ids: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """HF generate on one prompt (no padding), cut after the first EOS."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=eos,
            eos_token_id=eos,
        )[0, len(ids) :].tolist()
    return out[: out.index(eos) + 1] if eos in out else out


def engine_for(backend, model, tok, batch_size=8):
    return build_engine(backend, model, tok, batch_size=batch_size, bf16=False)


def test_greedy_tokens_equal_hf_generate(backend, lively):
    model, tok = lively
    ids = prompt_ids(tok)
    ro = engine_for(backend, model, tok).generate(ids, 1, SamplingParams(max_new_tokens=20, temperature=0))
    want = [hf_greedy(model, p, 20, tok.eos_token_id) for p in ids]
    assert len({tuple(w) for w in want}) == len(want)  # the prompts' outputs differ: a real check
    assert ro.completion_ids == want
    assert ro.truncated == [tok.eos_token_id not in w for w in want]
    assert ro.texts == tok.batch_decode(want, skip_special_tokens=True)


def test_sampled_logps_equal_a_teacher_forced_forward(backend, lively):
    """logp of each sampled token under softmax(logits / T) of the model itself, fp32."""
    model, tok = lively
    ids = prompt_ids(tok)
    T = 0.7
    ro = engine_for(backend, model, tok).generate(
        ids, 2, SamplingParams(max_new_tokens=12, temperature=T, seed=5)
    )
    assert ro.logps is not None
    for p, c, lp in zip(ro.prompt_ids, ro.completion_ids, ro.logps):
        assert len(lp) == len(c) >= 1
        with torch.no_grad():
            logits = model(torch.tensor([p + c])).logits[0, len(p) - 1 : -1]  # [len(c), V] predicting c
        want = torch.log_softmax(logits / T, -1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(lp), want, atol=1e-4, rtol=0)


def test_a_seed_reproduces_a_call_and_leaves_the_global_rng_alone(backend, lively):
    model, tok = lively
    eng = engine_for(backend, model, tok)
    ids = prompt_ids(tok)[:2]

    def run(seed):
        return eng.generate(ids, 3, SamplingParams(max_new_tokens=10, temperature=1.0, seed=seed))

    state = torch.get_rng_state()
    a, b, c = run(11), run(11), run(12)
    assert torch.equal(state, torch.get_rng_state())  # seeded calls draw from their own stream
    assert a.completion_ids == b.completion_ids and a.logps == b.logps
    assert a.completion_ids != c.completion_ids


def test_the_n_samples_of_a_prompt_are_adjacent(backend, lively):
    model, tok = lively
    ids = prompt_ids(tok)
    ro = engine_for(backend, model, tok).generate(ids, 3, SamplingParams(max_new_tokens=8, temperature=0))
    assert ro.prompt_ids == [p for p in ids for _ in range(3)]
    for i, p in enumerate(ids):  # greedy: the three samples of prompt i are its one greedy completion
        want = hf_greedy(model, p, 8, tok.eos_token_id)
        assert ro.completion_ids[3 * i : 3 * i + 3] == [want] * 3


def test_a_stop_id_cuts_the_completion_after_it(backend, lively):
    model, tok = lively
    p = prompt_ids(tok)[2]
    free = hf_greedy(model, p, 20, tok.eos_token_id)
    stop = free[4]
    k = free.index(stop)  # its first occurrence: <= 4
    ro = engine_for(backend, model, tok).generate(
        [p], 1, SamplingParams(max_new_tokens=20, temperature=0, stop=(stop,))
    )
    assert ro.completion_ids == [free[: k + 1]]
    assert ro.truncated == [False] and len(ro.logps[0]) == k + 1


def test_a_stop_string_cuts_at_the_token_that_completes_it(backend, lively):
    """The byte-level tokenizer has one token per byte, so the string made of tokens 5 and 6
    is first complete at the token where the decoded prefix first holds it."""
    model, tok = lively
    p = prompt_ids(tok)[2]
    free = hf_greedy(model, p, 20, tok.eos_token_id)
    s = tok.decode(free[5:7])
    k = next(i for i in range(len(free)) if s in tok.decode(free[: i + 1]))  # found by brute force
    ro = engine_for(backend, model, tok).generate(
        [p], 1, SamplingParams(max_new_tokens=20, temperature=0, stop=(s,))
    )
    assert ro.completion_ids == [free[: k + 1]] and ro.truncated == [False]
    assert s in ro.texts[0]
    # without the stop, hitting max_new_tokens is truncation
    ro = engine_for(backend, model, tok).generate([p], 1, SamplingParams(max_new_tokens=k + 1, temperature=0))
    assert ro.truncated == [tok.eos_token_id not in free[: k + 1]]


def test_outputs_follow_the_weights_of_the_last_sync(backend, lively):
    model, tok = lively
    ids = prompt_ids(tok)
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    eng = engine_for(backend, model, tok)
    before = eng.generate(ids, 1, greedy).completion_ids
    trained = shaken(model, 2)  # what an optimizer step would hand over
    eng.sync_weights(trained)
    after = eng.generate(ids, 1, greedy).completion_ids
    assert after != before
    assert after == [hf_greedy(trained, p, 12, tok.eos_token_id) for p in ids]


def test_text_prompts_go_through_the_same_path(backend, lively):
    model, tok = lively
    eng = engine_for(backend, model, tok)
    text = tok.decode(prompt_ids(tok)[0])
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=3)
    assert (
        eng.generate_text([text], 2, params).completion_ids
        == eng.generate(prompt_ids(tok)[:1], 2, params).completion_ids
    )


def test_an_unknown_backend_or_stop_entry_is_one_clear_error(lively):
    model, tok = lively
    with pytest.raises(ConfigError, match=r"unknown rollout.backend 'vllmx'; choose from: .*fast, hf"):
        build_engine("vllmx", model, tok, batch_size=4, bf16=False)
    with pytest.raises(ConfigError, match="stop entries must be non-empty strings or token ids"):
        SamplingParams(stop=("",))


def test_on_cuda_the_fast_backend_hands_over_to_hf(lively, caplog):
    """Built for a CUDA device (nothing runs on it here), ``fast`` is the hf engine, and there is
    no fast scorer: the KL reference then scores with the model's forward."""
    model, tok = lively
    with caplog.at_level("WARNING"):
        eng = build_engine("fast", model, tok, batch_size=4, bf16=True, device="cuda:0")
    assert type(eng).__name__ == "HFEngine" and "runs on the CPU only" in caplog.text
    assert build_scorer("fast", model, tok, bf16=True, device="cuda:0") is None
    assert build_scorer("hf", model, tok, bf16=False) is None
    assert build_scorer("fast", model, tok, bf16=False) is not None
