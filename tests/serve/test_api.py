"""A real `thinkrl serve` on tiny-random (fp32), talked to with the official openai client.

Expected outputs come from HF ``generate`` / the HF forward pass on the same model: the
server's greedy decoding must reproduce them token for token."""

import asyncio
import json
import statistics
import time

import openai
import pytest
import torch

from thinkrl.rollout.thinking import CLOSING_PHRASE

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
PHRASE = CLOSING_PHRASE.replace("</think>", "").strip()  # what the forced closing says, as reasoning text


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ref():
    from thinkrl.models import load_model

    model, tok = load_model("tiny-random")
    return model.eval(), tok


def hf_greedy(ref, prompt: str, max_new: int) -> list[int]:
    model, tok = ref
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=tok.pad_token_id,
    )
    new = out[0, ids.shape[1] :].tolist()
    cut = next((i for i, t in enumerate(new) if t == tok.eos_token_id), None)
    return new if cut is None else new[: cut + 1]


def chat_prompt(tok, q: str) -> str:
    return tok.apply_chat_template(
        [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
    )


def test_health_and_models(server, client, srv):
    h = srv.health(server)
    assert h["status"] == "ok" and h["slots"] == 32 and h["model"] == "tiny-random"
    assert [m.id for m in client.models.list().data] == ["tiny-random"]


def test_chat_greedy_equals_hf_generate_with_usage(client, ref):
    model, tok = ref
    want = hf_greedy(ref, chat_prompt(tok, "What is 2 + 3?"), 12)
    r = client.chat.completions.create(
        model="tiny-random",
        messages=[{"role": "user", "content": "What is 2 + 3?"}],
        temperature=0,
        max_tokens=12,
    )
    text = tok.decode(want, skip_special_tokens=True)
    assert r.choices[0].message.content == text.strip()
    assert r.choices[0].finish_reason == ("stop" if want[-1] == tok.eos_token_id else "length")
    n_prompt = len(tok(chat_prompt(tok, "What is 2 + 3?"), add_special_tokens=False).input_ids)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, len(want))
    assert r.usage.total_tokens == n_prompt + len(want)


def test_stream_carries_reasoning_content_and_equals_the_plain_reply(client, ref):
    """enable_thinking opens <think>; a budget of 5 tokens then forces the closing phrase. The
    stream's reasoning deltas, joined, are the thinking; its content deltas the answer; both
    equal the non-streamed reply's fields."""
    _, tok = ref
    kw = dict(
        model="tiny-random",
        messages=[{"role": "user", "content": "Hi"}],
        temperature=0,
        max_tokens=130,
        extra_body={"thinking_budget": 5, "chat_template_kwargs": {"enable_thinking": True}},
    )
    reasoning, content, finish = "", "", None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            d = c.delta
            reasoning += getattr(d, "reasoning_content", None) or ""
            content += d.content or ""
            finish = c.finish_reason or finish
    assert reasoning.strip().endswith(PHRASE) and "</think>" not in reasoning + content
    # the 5 thought tokens are HF generate's on the prompt that ends with "<think>\n"
    want = hf_greedy(ref, chat_prompt(tok, "Hi") + "<think>\n", 5)
    if tok.eos_token_id in want:
        pytest.skip("the model ends inside its budget")
    thought = tok.decode(want, skip_special_tokens=True).strip()
    assert reasoning.strip() == (thought + CLOSING_PHRASE.split("</think>")[0]).strip()
    plain = client.chat.completions.create(**kw)
    msg = plain.choices[0].message
    assert (msg.reasoning_content, msg.content) == (reasoning.strip(), content.strip())
    assert plain.choices[0].finish_reason == finish


def test_budget_zero_and_reasoning_effort(client, ref):
    """Budget 0: the thinking is the closing phrase alone. reasoning_effort maps to a budget;
    giving both is refused."""
    n_phrase = len(ref[1](CLOSING_PHRASE, add_special_tokens=False).input_ids)
    base = dict(
        model="tiny-random", messages=[{"role": "user", "content": "Hi"}], temperature=0, max_tokens=40
    )
    r = client.chat.completions.create(
        **{**base, "max_tokens": n_phrase + 8},
        extra_body={"thinking_budget": 0, "chat_template_kwargs": {"enable_thinking": True}},
    )
    assert r.choices[0].message.reasoning_content == PHRASE
    assert r.usage.completion_tokens > n_phrase  # the answer follows the forced phrase
    low = client.chat.completions.create(
        **base, reasoning_effort="low", extra_body={"chat_template_kwargs": {"enable_thinking": True}}
    )
    assert low.choices[0].finish_reason == "length"  # 40 tokens < the low budget (256): thinking never cut
    assert low.choices[0].message.content == "" and PHRASE not in (
        low.choices[0].message.reasoning_content or ""
    )
    with pytest.raises(openai.BadRequestError, match="not both"):
        client.chat.completions.create(**base, reasoning_effort="low", extra_body={"thinking_budget": 3})


def test_no_think_prefills_an_empty_block(client, ref):
    """enable_thinking=False on a template without it: the prompt gets Qwen3's empty
    <think></think>, so there is no reasoning and the usage counts the longer prompt."""
    _, tok = ref
    r = client.chat.completions.create(
        model="tiny-random",
        messages=[{"role": "user", "content": "Hi"}],
        temperature=0,
        max_tokens=4,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    prompt = chat_prompt(tok, "Hi") + "<think>\n\n</think>\n\n"
    assert r.usage.prompt_tokens == len(tok(prompt, add_special_tokens=False).input_ids)
    assert r.choices[0].message.reasoning_content is None
    assert (
        r.choices[0].message.content
        == tok.decode(hf_greedy(ref, prompt, 4), skip_special_tokens=True).strip()
    )


def test_completions_logprobs_are_the_models(client, ref):
    """Greedy completion tokens with log-probs and top-3 alternatives: each token's log-prob
    is log_softmax of the HF forward pass at its position, and ranks first."""
    model, tok = ref
    prompt = "The cat sat on"
    r = client.completions.create(model="tiny-random", prompt=prompt, max_tokens=8, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    ids = tok(prompt, add_special_tokens=False).input_ids
    want = hf_greedy(ref, prompt, 8)
    assert r.usage.completion_tokens == len(want) == len(lp.token_logprobs)
    with torch.no_grad():
        logits = model(torch.tensor([ids + want])).logits[0, len(ids) - 1 : -1]  # [T, V]
    ref_lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(want)[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(lp.token_logprobs), ref_lp, atol=1e-4)
    assert lp.tokens == [tok.decode([t]) for t in want]
    for top, chosen, v in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs):
        assert (
            len(top) <= 3
            and max(top.values()) == pytest.approx(v, abs=1e-5)
            and top[chosen] == pytest.approx(v)
        )
    assert lp.text_offset[0] == 0 and r.choices[0].text == tok.decode(want, skip_special_tokens=True)


def test_stop_strings_cut_the_text(client, ref):
    _, tok = ref
    full = client.completions.create(model="tiny-random", prompt="abc", max_tokens=12, temperature=0).choices[
        0
    ]
    text = full.text
    stop = next((text[i : i + 2] for i in range(2, len(text) - 2) if "\ufffd" not in text[i : i + 2]), None)
    if stop is None:
        pytest.skip("no clean two-character stop string in the greedy text")
    cut = client.completions.create(
        model="tiny-random", prompt="abc", max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_n_and_seed(client):
    kw = dict(model="tiny-random", prompt="Once", max_tokens=10, temperature=1.0, n=3, seed=11, logprobs=0)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    texts = [c.text for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.text for c in b.choices]  # a seed makes the request reproducible
    assert len(set(texts)) > 1  # each choice has its own stream (seed + index)
    assert a.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in a.choices)
    assert a.choices[0].logprobs.top_logprobs is None  # logprobs=0: the chosen tokens only


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "thinking_budget": -1}, "thinking_budget"),
        ({"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [{"role": "user", "content": "x"}], "bogus": 1}, "bogus"),
    ],
)
def test_bad_chat_requests_are_400_with_an_openai_error(server, srv, body, param):
    status, reply = srv.post(server + "/v1/chat/completions", body)
    assert status == 400
    err = reply["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_malformed_json_long_prompts_and_unknown_models(server, client, srv):
    status, reply = srv.post(server + "/v1/completions", b"{not json")
    assert status == 400 and reply["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny-random", prompt="x" * 3000, max_tokens=2)  # 3000 tokens > 2048
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model="tiny-random", prompt="")


def test_a_client_that_disconnects_frees_its_slot(server, client, srv):
    """Read two chunks of a long stream, then close it: the server frees the slot right away
    instead of decoding the remaining ~1000 tokens."""
    kw = dict(
        model="tiny-random",
        prompt="Tell me a long story",
        max_tokens=1000,
        temperature=1.0,
        seed=5,
        extra_body={"min_tokens": 1000},
    )
    full = client.completions.create(**kw)
    assert full.usage.completion_tokens == 1000  # this request, left alone, decodes 1000 steps
    srv.wait_idle(server)
    before = srv.health(server)["steps"]
    stream = client.completions.create(stream=True, **kw)
    it = iter(stream)
    next(it), next(it)
    assert srv.health(server)["active"] == 1
    stream.close()
    h = srv.wait_idle(server, timeout=5)
    assert h["active"] == 0 and h["waiting"] == 0
    ran = h["steps"] - before
    time.sleep(0.5)
    assert srv.health(server)["steps"] - before == ran < 1000  # nothing runs on after the disconnect


def test_32_concurrent_streaming_clients_all_complete(server, srv):
    """The load test: 32 streaming chats at once. Every one completes with its own full
    usage; the decode steps are shared (far fewer steps than tokens); prints latency and
    throughput."""
    aclient = openai.AsyncOpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=120)
    srv.wait_idle(server)
    before = srv.health(server)["steps"]
    M = 24

    async def one(i):
        t0 = time.perf_counter()
        stream = await aclient.chat.completions.create(
            model="tiny-random",
            messages=[{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}],
            max_tokens=M,
            temperature=1.0,
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
        )
        finish, usage, chunks = None, None, 0
        async for chunk in stream:
            chunks += 1
            for c in chunk.choices:
                finish = c.finish_reason or finish
            usage = chunk.usage or usage
        return time.perf_counter() - t0, finish, usage

    async def main():
        t0 = time.perf_counter()
        out = await asyncio.gather(*(one(i) for i in range(32)))
        return out, time.perf_counter() - t0

    out, wall = asyncio.run(main())
    assert len(out) == 32 and all(f in ("stop", "length") and u is not None for _, f, u in out)
    tokens = sum(u.completion_tokens for _, _, u in out)
    assert all(u.completion_tokens == M for _, f, u in out if f == "length")
    lat = sorted(t for t, _, _ in out)
    steps = srv.health(server)["steps"] - before
    assert (
        steps < tokens / 4
    )  # requests shared decode steps (32 sequential requests would take `tokens` steps)
    p50, p99 = statistics.median(lat), lat[min(31, int(0.99 * 32))]
    print(
        f"\n32 concurrent streams: p50 {p50:.2f}s, p99 {p99:.2f}s, {tokens} tokens in {wall:.2f}s "
        f"= {tokens / wall:.0f} tokens/s aggregate, {steps} decode steps"
    )
    assert srv.wait_idle(server)["active"] == 0


def test_teacher_endpoint_and_judge_work_against_serve(server, client, tmp_path):
    """`thinkrl sample`'s teacher path and the judge reward's request, against this server."""
    from thinkrl.cli import main
    from thinkrl.pipeline.teacher import EndpointConfig, chat_completion
    from thinkrl.rewards.learned import ask

    ep = EndpointConfig(base_url=server + "/v1", model="tiny-random")
    msgs = [{"role": "user", "content": "What is 1 + 1?"}]
    got = chat_completion(ep, msgs, n=2, temperature=0, max_tokens=8)
    direct = client.chat.completions.create(model="tiny-random", messages=msgs, temperature=0, max_tokens=8)
    assert got == [("", direct.choices[0].message.content)] * 2
    reply = ask(
        server + "/v1",
        "tiny-random",
        "Is 2 the answer?",
        timeout=30,
        retries=0,
        api_key="",
        max_concurrency=2,
    )
    judged = client.chat.completions.create(
        model="tiny-random",
        messages=[{"role": "user", "content": "Is 2 the answer?"}],
        temperature=0,
        max_tokens=256,
    )
    assert reply == judged.choices[0].message.content
    task = tmp_path / "task.jsonl"
    task.write_text(
        "".join(json.dumps({"question": q, "answer": "2"}) + "\n" for q in ("1 + 1", "0 + 2", "3 - 1"))
    )
    out = tmp_path / "traces.jsonl"
    assert (
        main(
            [
                "sample",
                "model=tiny-random",
                f"task.name={task}",
                "n=2",
                "prompts=3",
                "max_new_tokens=8",
                f"endpoint.base_url={server}/v1",
                "endpoint.model=tiny-random",
                "task.template=chat",
                "task.eval_size=1",
                "require_format=false",
                f"output={out}",
            ]
        )
        == 0
    )
    stats = json.loads(out.with_suffix(".stats.json").read_text())
    assert stats["prompts"] == 2 and stats["samples"] == 4  # 3 questions, 1 held out; 2 replies each
    assert out.exists()


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model="tiny-random",
        messages=[{"role": "user", "content": "Hi"}],
        temperature=0,
        max_tokens=5,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 5
    for t in content:  # greedy: the chosen token is the most likely one
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5)
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob


def test_a_dropped_non_streamed_request_frees_its_slot(server, srv):
    """A client that closes its connection while waiting for a plain (non-streamed) reply."""
    import http.client
    from urllib.parse import urlparse

    srv.wait_idle(server)
    before = srv.health(server)["steps"]
    u = urlparse(server)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    body = {"prompt": "Tell me a long story", "max_tokens": 1000, "min_tokens": 1000, "temperature": 1.0}
    conn.request(
        "POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    deadline = time.monotonic() + 10
    while srv.health(server)["active"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    conn.close()
    h = srv.wait_idle(server, timeout=5)
    assert h["active"] == 0 and h["steps"] - before < 1000


def test_streamed_choices_interleave_and_equal_the_plain_reply(client):
    kw = dict(
        model="tiny-random",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=12,
        n=2,
        seed=4,
        temperature=1.0,
    )
    text, finish = {0: "", 1: ""}, {}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    plain = client.chat.completions.create(**kw)
    assert [text[0].strip(), text[1].strip()] == [c.message.content for c in plain.choices]
    assert set(finish) == {0, 1} and text[0] != text[1]
