"""sample_and_score, the one render -> generate -> score path: what the rewards see, how the
engine is called, and the progress bars of `thinkrl eval` and `thinkrl sample`."""

import io
import uuid

import pytest
import torch

from thinkrl.config import TaskConfig
from thinkrl.rewards import REWARDS, RewardModel
from thinkrl.rollout import Rollout, SamplingParams, build_engine
from thinkrl.rollout.scoring import exact_chunk, sample_and_score
from thinkrl.tasks import Example

PLAIN = TaskConfig(template="plain", prefill="P:")  # prompt "q\nP:", prefill "P:"


class ScriptedEngine:
    """Completion j of each prompt is "c<j>", j + 1 tokens long, truncated for j = 1; records
    every call (prompts, n, seed)."""

    def __init__(self, batch_size=None):
        self.calls = []
        if batch_size is not None:
            self.batch_size = batch_size

    def generate_text(self, prompts, n, params):
        self.calls.append((list(prompts), n, params.seed))
        return Rollout(
            prompt_ids=[[1]] * (len(prompts) * n),
            completion_ids=[[0] * (j + 1) for _ in prompts for j in range(n)],
            texts=[f"c{j}" for _ in prompts for j in range(n)],
            truncated=[j == 1 for _ in prompts for j in range(n)],
        )


@pytest.fixture(scope="module")
def recording_reward():
    """A reward that records what it was given and returns the token count."""
    seen = []
    name = f"test_seen_{uuid.uuid4().hex[:8]}"

    @REWARDS.register(name)
    def _reward(completion, example, *, num_tokens, truncated, max_tokens):
        seen.append((completion, example.question, num_tokens, truncated, max_tokens))
        return float(num_tokens)

    return name, seen


def examples(*qs):
    return [Example(question=q, answer="1") for q in qs]


def test_rewards_see_prefill_plus_completion_with_its_tokens_and_truncation(recording_reward):
    name, seen = recording_reward
    seen.clear()
    engine, timings = ScriptedEngine(), {"time_generate": 1.0}
    exs = examples("q1", "q2")
    g = sample_and_score(
        engine,
        None,
        exs,
        PLAIN,
        2,
        SamplingParams(max_new_tokens=5),
        RewardModel({name: 2.0}),
        timings=timings,
    )
    assert engine.calls == [(["q1\nP:", "q2\nP:"], 2, None)]  # one call, every prompt
    assert g.texts == ["P:c0", "P:c1"] * 2 and g.rendered == [("q1\nP:", "P:"), ("q2\nP:", "P:")]
    # rows q*2 + j: example q, completion j of j + 1 tokens, truncated for j = 1; cap 5
    assert seen == [
        ("P:c0", "q1", 1, False, 5),
        ("P:c1", "q1", 2, True, 5),
        ("P:c0", "q2", 1, False, 5),
        ("P:c1", "q2", 2, True, 5),
    ]
    assert g.parts[name] == [1.0, 2.0, 1.0, 2.0] and g.totals == [2.0, 4.0, 2.0, 4.0]  # weight 2
    assert g.examples == exs and len(g.ro.texts) == 4
    assert timings["time_generate"] > 1.0 and timings["time_score"] > 0.0  # added to, not replaced


def test_group_seeds_make_one_call_per_group_with_its_seed():
    engine = ScriptedEngine()
    g = sample_and_score(
        engine,
        None,
        examples("q1", "q2", "q3"),
        PLAIN,
        2,
        SamplingParams(max_new_tokens=5),
        RewardModel({"format": 1.0}),
        group_seeds=iter([7, 9, 11]),
    )
    assert engine.calls == [(["q1\nP:"], 2, 7), (["q2\nP:"], 2, 9), (["q3\nP:"], 2, 11)]
    assert g.texts == ["P:c0", "P:c1"] * 3 and g.ro.truncated == [False, True] * 3


def test_exact_chunk_by_hand():
    # lcm(b / gcd(b, n), max(1, b // n)) prompts
    assert exact_chunk(64, 1) == 64  # lcm(64, 64)
    assert exact_chunk(64, 8) == 8  # lcm(8, 8)
    assert exact_chunk(5, 3) == 5  # lcm(5, 1): 15 rows = three hf batches of 5
    assert exact_chunk(64, 3) == 1344  # lcm(64, 21): 3 does not divide 64
    assert exact_chunk(2, 4) == 1  # lcm(1, 1): a prompt's 4 rows are two hf batches


def test_a_progress_bar_splits_the_calls_but_not_the_sampling():
    engine = ScriptedEngine(batch_size=4)
    exs = examples("a", "b", "c", "d", "e")
    sample_and_score(
        engine, None, exs, PLAIN, 2, SamplingParams(), RewardModel({"format": 1.0}), progress="eval"
    )
    assert [c[0] for c in engine.calls] == [
        ["a\nP:", "b\nP:"],
        ["c\nP:", "d\nP:"],
        ["e\nP:"],
    ]  # exact_chunk(4, 2)
    engine.calls.clear()
    many = examples(*[f"q{i}" for i in range(100)])
    sample_and_score(
        engine, None, many, PLAIN, 2, SamplingParams(), RewardModel({"format": 1.0}), progress="x"
    )
    # at most 20 calls: 2 * ceil(100 / (2 * 20)) = 6 prompts a call, 16 of them and one of 4
    assert [len(c[0]) for c in engine.calls] == [6] * 16 + [4]
    engine.calls.clear()
    seeded = SamplingParams(seed=3)  # a seeded call stays one call: chunks would each restart the seed
    sample_and_score(engine, None, exs, PLAIN, 2, seeded, RewardModel({"format": 1.0}), progress="eval")
    assert len(engine.calls) == 1


@pytest.mark.parametrize("backend", ["fast", "hf"])
def test_chunked_calls_sample_the_tokens_of_one_call(backend, tiny_pair, shake):
    """7 prompts x 3 samples at temperature 1 with batch_size 5: the bar's calls (5 + 2
    prompts) draw exactly the tokens one call draws from the same random state."""
    import copy

    model, tok = tiny_pair
    engine = build_engine(backend, shake(copy.deepcopy(model)), tok, batch_size=5, bf16=False)
    exs = examples(*[f"{a} + {b} =" for a, b in zip(range(7), range(3, 10))])
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    runs = []
    for progress in (None, "eval"):
        torch.manual_seed(0)
        g = sample_and_score(
            engine, tok, exs, PLAIN, 3, params, RewardModel({"format": 1.0}), progress=progress
        )
        runs.append(g.ro)
    assert runs[0].completion_ids == runs[1].completion_ids and runs[0].texts == runs[1].texts
    assert len({tuple(c) for c in runs[0].completion_ids}) > 1  # sampled, not one repeated completion
    assert runs[0].logps == runs[1].logps


class _Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize(
    "tty,progress,shown", [(True, True, True), (False, True, False), (True, False, False)]
)
def test_the_eval_bar_shows_on_a_terminal_unless_progress_is_off(tty, progress, shown, monkeypatch):
    from thinkrl.eval import evaluate

    err = _Tty() if tty else io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    res = evaluate(
        ScriptedEngine(batch_size=2),
        None,
        examples("q1", "q2", "q3"),
        PLAIN,
        max_new_tokens=4,
        progress=progress,
    )
    assert res["summary"]["n"] == 3
    assert ("eval: " in err.getvalue() and "3/3" in err.getvalue()) == shown
    assert err.getvalue() == "" or shown


@pytest.mark.parametrize(
    "tty,progress,shown", [(True, True, True), (False, True, False), (True, False, False)]
)
def test_the_sample_bar_shows_on_a_terminal_unless_progress_is_off(
    tty, progress, shown, monkeypatch, tmp_path
):
    import thinkrl.pipeline.sample as sample

    err = _Tty() if tty else io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    monkeypatch.setattr(sample, "engine_on", lambda *a, **k: ScriptedEngine(batch_size=4))
    cfg = sample.SampleConfig(
        model="tiny-random",
        n=2,
        prompts=3,
        output=str(tmp_path / "d.jsonl"),
        progress=progress,
        task=TaskConfig(name="chain_sum", train_size=5, eval_size=2, template="plain", prefill=""),
    )
    stats = sample.run_sample(cfg)
    assert stats["samples"] == 6 and stats["reasons"] == {"wrong": 6}  # "c0", "c1" answer nothing
    # (loading the model may draw transformers' own bar: look for ours by its label)
    assert ("sample: " in err.getvalue() and "3/3" in err.getvalue()) == shown
