"""The cache-append turn decoder (slots: observations appended to each episode's KV cache)
gives what re-running the whole history gives, greedily: the same tokens, the same log-probs."""

import pytest

from thinkrl.config import TaskConfig
from thinkrl.envs.decoders import CacheAppend, RePrefill, make_decoder
from thinkrl.envs.episodes import run_episodes
from thinkrl.rollout import SamplingParams
from thinkrl.rollout.fast import FastEngine
from thinkrl.tasks import Example


class Echo:
    """Answers every turn with an observation, 1 + len(question) % 3 times, then ends the episode:
    episodes end at different turns, so slots are freed while others go on."""

    multi_turn = True

    def __init__(self, stop):
        self.stop = stop

    def reset(self, example):
        return [{"role": "user", "content": example.question}]

    def step(self, messages, turn):
        calls = sum(m["role"] == "tool" for m in messages)
        if calls == 1 + len(messages[0]["content"]) % 3:
            return None, None, True, {"reason": "answered"}
        # ends with z's, which the greedy tiny model goes on repeating until the stop "zzzz"
        return f"\n[obs {calls}: {len(turn)}] " + "z" * (calls + 1), None, False, {}


def test_cache_append_equals_reprefill_greedy(tiny):
    model, tok = tiny
    eng = FastEngine(model, tok, batch_size=8, bf16=False)
    params = SamplingParams(max_new_tokens=80, temperature=0.0)
    exs = [Example("abc", "1"), Example("hello", "2"), Example("Q: 6*7?", "3")]
    # greedy tiny-random repeats the last character: "b" of the prefill, then the observations' z's
    cfg = TaskConfig(template="plain", prefill="b")
    env = Echo(("bbb", "zzzz"))
    a, _ = run_episodes(env, RePrefill(eng, tok), tok, exs, cfg, 2, params, 8)
    b, _ = run_episodes(env, CacheAppend(eng, tok), tok, exs, cfg, 2, params, 8)
    assert [e.tool_calls() for e in a] == [1, 1, 3, 3, 2, 2] and all(e.reason == "answered" for e in a)
    # turn 1 "bbb" (3 tokens), then after each observation "zzzz" (4)
    assert [t["end"] - t["start"] for t in a[2].turns if t["role"] == "assistant"] == [3, 4, 4, 4]
    for x, y in zip(a, b):
        assert x.ids == y.ids and x.mask == y.mask and x.reason == y.reason
        assert x.logps == pytest.approx(y.logps, abs=1e-4)


def test_decoder_choice(tiny):
    from thinkrl.config import ConfigError
    from thinkrl.rollout import HFEngine

    model, tok = tiny
    assert isinstance(make_decoder(FastEngine(model, tok, bf16=False), tok), CacheAppend)
    assert isinstance(make_decoder(FastEngine(model, tok, bf16=False), tok, "reprefill"), RePrefill)
    hf = HFEngine(model, tok)
    assert isinstance(make_decoder(hf, tok), RePrefill)
    with pytest.raises(ConfigError, match="env.decoder=cache needs rollout.backend=fast"):
        make_decoder(hf, tok, "cache")


class Gate:
    """Episode "slow"'s first tool call blocks until episode "fast" has had three observations:
    possible only if "fast" goes on decoding while "slow" waits for its tool."""

    multi_turn = True
    stop = ("zzzz", "bbb")

    def __init__(self):
        import threading

        self.opened, self.fast_steps = threading.Event(), 0

    def reset(self, example):
        return [{"role": "user", "content": example.question}]

    def step(self, messages, turn):
        calls = sum(m["role"] == "tool" for m in messages)
        if messages[0]["content"] == "slow":
            if calls == 0:
                return " z", None, False, {"waited_for_fast": self.opened.wait(timeout=20)}
            return None, None, True, {"reason": "answered"}
        self.fast_steps += 1
        if self.fast_steps == 3:
            self.opened.set()
        return (" z", None, False, {}) if calls < 3 else (None, None, True, {"reason": "answered"})


def test_an_episode_goes_on_while_another_waits_for_its_tool(tiny):
    model, tok = tiny
    eng = FastEngine(model, tok, batch_size=8, bf16=False)
    eps, _ = run_episodes(
        Gate(),
        CacheAppend(eng, tok),
        tok,
        [Example("slow", "1"), Example("fast", "2")],
        TaskConfig(template="plain", prefill="b"),
        1,
        SamplingParams(max_new_tokens=80, temperature=0.0),
        8,
    )
    slow, fast = eps
    assert slow.turns[1]["waited_for_fast"] is True  # fast's third observation came while slow's call ran
    assert fast.tool_calls() == 3 and slow.tool_calls() == 1
    assert slow.reason == fast.reason == "answered"


def test_hf_engine_reprefill_gives_the_same_episodes(tiny):
    """The hf engine's id-level generation, cut at stop strings afterwards, gives the fast engine's
    episodes greedily (tokens; the hf engine gives no log-probs)."""
    from thinkrl.rollout import HFEngine

    model, tok = tiny
    exs = [Example("abc", "1"), Example("hello", "2")]
    cfg = TaskConfig(template="plain", prefill="b")
    params = SamplingParams(max_new_tokens=60, temperature=0.0)
    fast, _ = run_episodes(
        Echo(("bbb", "zzzz")), RePrefill(FastEngine(model, tok, bf16=False), tok), tok, exs, cfg, 1, params, 8
    )
    hf, _ = run_episodes(
        Echo(("bbb", "zzzz")), RePrefill(HFEngine(model, tok), tok), tok, exs, cfg, 1, params, 8
    )
    assert [e.ids for e in hf] == [e.ids for e in fast] and [e.mask for e in hf] == [e.mask for e in fast]
    assert [e.tool_calls() for e in hf] == [1, 3]
