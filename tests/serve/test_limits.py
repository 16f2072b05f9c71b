"""A server with one slot and one queue place (the serial hf fallback, backend=hf): a third
concurrent request gets HTTP 429; the fallback still serves correct, streamed replies."""

import threading
import time

import openai
import pytest


@pytest.fixture(scope="module")
def small(srv):
    with srv.running_server("backend=hf", "max_queue=1") as url:
        yield url


def test_the_hf_fallback_serves_one_request_at_a_time(small, srv):
    from thinkrl.models import load_model

    h = srv.health(small)
    assert h["slots"] == 1
    client = openai.OpenAI(base_url=small + "/v1", api_key="none", max_retries=0)
    model, tok = load_model("tiny-random")
    prompt = "The cat"
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    want = model.generate(
        ids,
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        temperature=None,
        top_p=None,
        top_k=None,
    )[0, ids.shape[1] :].tolist()
    parts = [
        c.choices[0].text
        for c in client.completions.create(
            model="tiny-random",
            prompt=prompt,
            max_tokens=6,
            temperature=0,
            stream=True,
            extra_body={"min_tokens": 6},
        )
    ]
    assert "".join(parts) == tok.decode(want, skip_special_tokens=True)


def test_a_full_queue_answers_429(small, srv):
    """Two long requests take the slot and the queue place; a third is refused at once with
    an OpenAI-style rate-limit error, and the first two still complete."""
    body = {"prompt": "x", "max_tokens": 150, "min_tokens": 150, "temperature": 1.0}
    results = []

    def run():
        results.append(srv.post(small + "/v1/completions", body))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while (srv.health(small)["active"] + srv.health(small)["waiting"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    status, reply = srv.post(small + "/v1/completions", body)
    assert status == 429
    assert reply["error"]["type"] == "rate_limit_error" and "capacity" in reply["error"]["message"]
    client = openai.OpenAI(base_url=small + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="tiny-random", messages=[{"role": "user", "content": "x"}], stream=True
        )  # refused before the stream starts: a status, not an event
    for t in threads:
        t.join()
    assert [s for s, _ in results] == [200, 200]
    assert all(r["usage"]["completion_tokens"] == 150 for _, r in results)
    assert srv.wait_idle(small)["active"] == 0


@pytest.mark.parametrize(
    "argv, says",
    [
        (["serve"], "thinkrl serve needs model=PATH"),
        (["serve", "model=tiny-random", "slots=4"], "slots"),
        (["serve", "model=tiny-random", "backend=vllm"], "backend 'vllm' unknown"),
        (["chat"], "thinkrl chat needs model=PATH"),
        (["chat", "model=tiny-random", "thinking=maybe"], "thinking must be auto, on or off"),
    ],
)
def test_bad_options_are_one_line(argv, says, capsys):
    from thinkrl.cli import main

    assert main(argv) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith("thinkrl: error:") and says in err[0]


def test_a_port_in_use_is_one_line(small, capsys):
    from thinkrl.cli import main

    port = int(small.rsplit(":", 1)[1])
    assert main(["serve", "model=tiny-random", f"port={port}"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{port}" in err[0]
