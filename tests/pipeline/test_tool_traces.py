"""Tool-use traces (the traces stage's tool style), their SFT encoding as RL sees an episode,
and the cold-start pipeline traces(tool) -> sft -> rl end to end on tiny-random."""

import json
from pathlib import Path

import pytest
import yaml

from thinkrl.cli import main
from thinkrl.config import ConfigError, EnvConfig, TaskConfig
from thinkrl.data import IGNORE, encode_sft_rows
from thinkrl.envs import build_env
from thinkrl.envs import python as pyenv
from thinkrl.envs.decoders import Turn
from thinkrl.envs.episodes import run_episodes
from thinkrl.models import build_tiny_tokenizer
from thinkrl.pipeline.traces import TracesConfig, parse_terms, write_traces
from thinkrl.rewards import RewardModel
from thinkrl.rollout import SamplingParams
from thinkrl.sandbox import Result
from thinkrl.tasks import DataError, Example, build_task

ROOT = Path(__file__).resolve().parents[2]
THREE = TaskConfig(
    name="chain_sum", params={"min_terms": 3, "max_terms": 3, "min_digits": 2, "max_digits": 3}
)
PLAIN = TaskConfig(template="plain", prefill="")
EOS = 258  # <|im_end|> of the tiny tokenizer


def rows(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def tool_cfg(tmp_path, **kw):
    return TracesConfig(output=str(tmp_path / "t.jsonl"), style="tool", task=THREE, **kw)


def test_tool_traces_hold_the_sandboxs_output_and_score_right(tmp_path):
    stats = write_traces(tool_cfg(tmp_path, prompts=24))
    got = rows(tmp_path / "t.jsonl")
    assert stats["rows"] == len(got) == 24 and stats["tool_calls_per_row"] == 1.0
    assert sum(stats["skipped"].values()) == 0
    by_q = {ex.question: ex for ex in build_task(THREE).train}
    for r in got:
        ex = by_q[r["prompt"]]
        total = sum(parse_terms(ex.question))
        assert r["env"] == "python" and [t["role"] for t in r["turns"]] == ["assistant", "tool", "assistant"]
        call, obs, answer = (t["text"] for t in r["turns"])
        assert call.endswith("</python>") and pyenv.tool_call(call) is not None
        assert obs == f"\n<output>\n{total}\n</output>\n" and r["turns"][1]["tool_status"] == "ok"
        assert answer.endswith(f"</think> <answer> {total} </answer>") and str(total) == ex.answer
    # what RL's rewards judge: the prefill and the policy's turns (the observation left out)
    rm = RewardModel({"accuracy": 1.0, "format": 1.0})
    texts = ["<think>" + r["turns"][0]["text"] + r["turns"][2]["text"] for r in got]
    _, parts = rm.score(texts, [by_q[r["prompt"]] for r in got])
    assert parts["accuracy"] == [1.0] * 24 and parts["format"] == [1.0] * 24
    # the phrasing is drawn per row from the seed: the same seed gives the same file
    first = (tmp_path / "t.jsonl").read_text()
    write_traces(tool_cfg(tmp_path, prompts=24))
    assert (tmp_path / "t.jsonl").read_text() == first


def test_the_observation_is_what_the_sandbox_printed(tmp_path, monkeypatch):
    """A sandbox that prints 7 for every program: every trace then disagrees with its gold
    answer and is skipped, so the observation is the run's output, not the expected sum."""
    seven = Result(status="ok", stdout="7\n", stderr="", returncode=0, seconds=0.01)
    monkeypatch.setattr(pyenv, "run_python", lambda code, limits: seven)
    with pytest.raises(DataError, match="no tool call of 6 gave the answer"):
        write_traces(tool_cfg(tmp_path, prompts=6))
    timeout = Result(status="timeout", stdout="", stderr="", returncode=-9, seconds=5.0)
    calls = iter([seven] + [timeout] * 5)
    monkeypatch.setattr(pyenv, "run_python", lambda code, limits: next(calls))
    with pytest.raises(DataError) as e:
        write_traces(tool_cfg(tmp_path, prompts=6))
    assert "'tool failed': 5" in str(e.value) and "'tool output disagrees': 1" in str(e.value)


def test_tool_style_needs_the_python_env_and_known_styles():
    with pytest.raises(ConfigError, match="needs env.name=python"):
        TracesConfig(style="tool", env=EnvConfig(name="single_turn")).validate()
    with pytest.raises(ConfigError, match="choose from: long_cot, tool"):
        TracesConfig(style="toolz").validate()


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(added=("</python>",))  # "</python>" encodes as one token


class Sampled:
    """A policy whose k-th turn is the ids of ``texts[k]`` encoded alone (what SFT trains on)."""

    def __init__(self, tok, texts):
        self.tok, self.texts, self.k = tok, texts, 0

    def open(self, prompts):
        self.seqs = [list(p) for p in prompts]

    def turn(self, rows, budgets, params, stop):
        ids = self.tok(self.texts[self.k], add_special_tokens=False).input_ids
        ids += [EOS] if self.k == len(self.texts) - 1 else []
        self.k += 1
        self.seqs[0] += ids
        return [Turn(ids, [-0.5] * len(ids), not ids or ids[-1] != EOS)]

    def extend(self, row, ids):
        self.seqs[row] += ids

    def close(self):
        pass


def test_two_turn_trace_mask_by_hand(tok):
    call, answer = "<python>print(6*7)</python>", "<answer>42</answer>"
    obs = "\n<output>\n42\n</output>\n"
    row = {
        "prompt": "6*7?",
        "env": "python",
        "turns": [
            {"role": "assistant", "text": call},
            {"role": "tool", "text": obs},
            {"role": "assistant", "text": answer},
        ],
    }
    [enc] = encode_sft_rows([row], tok, PLAIN, max_len=1000)
    # The plain template puts the environment's system prompt before the question:
    # TOOL_PROMPT + "\n\n" + "6*7?" + "\n" (no prefill). Byte-level tokens, except that the
    # one "</python>" in TOOL_PROMPT (9 bytes) is one token: P = len(TOOL_PROMPT) - 8 + 7.
    assert pyenv.TOOL_PROMPT.count("</python>") == 1
    P = len(pyenv.TOOL_PROMPT.encode()) - 8 + 7
    # call: "<python>print(6*7)" is 18 bytes, then "</python>": 19 tokens, targets
    # obs: 1 + 8 + 1 + 2 + 1 + 9 + 1 = 23 bytes ("</output>" is not an added token), context
    # answer: 8 + 2 + 9 = 19 bytes, then EOS: 20 tokens, targets
    assert len(enc.input_ids) == P + 19 + 23 + 20
    targets = [i for i, lab in enumerate(enc.labels) if lab != IGNORE]
    assert targets == list(range(P, P + 19)) + list(range(P + 42, P + 62))
    assert [enc.input_ids[i] for i in targets] == [enc.labels[i] for i in targets]
    assert enc.input_ids[P + 18] == tok.convert_tokens_to_ids("</python>") and enc.input_ids[-1] == EOS
    assert tok.decode(enc.input_ids[P + 19 : P + 42]) == obs
    # The same ids and mask as the RL episode of a policy that samples these turns.
    env = build_env(EnvConfig(name="python"))
    [ep], _ = run_episodes(
        env, Sampled(tok, [call, answer]), tok, [Example("6*7?", "42")], PLAIN, 1, SamplingParams(200), 8
    )
    assert ep.prompt_ids + ep.ids == enc.input_ids
    assert [0] * P + ep.mask == [int(lab != IGNORE) for lab in enc.labels]


def test_chat_prompt_carries_the_tool_system_prompt(tok):
    cfg = TaskConfig(template="chat", prefill="<think>", system_prompt="Be brief.", fewshot=[])
    row = {"prompt": "6*7?", "env": "python", "turns": [{"role": "assistant", "text": " 42 </think>"}]}
    [enc] = encode_sft_rows([row], tok, cfg, max_len=1000)
    context = [i for i, lab in zip(enc.input_ids, enc.labels) if lab == IGNORE]
    assert tok.decode(context) == (
        f"<|im_start|>system\nBe brief.\n\n{pyenv.TOOL_PROMPT}<|im_end|>\n"
        "<|im_start|>user\n6*7?<|im_end|>\n<|im_start|>assistant\n<think>"
    )
    assert tok.decode(enc.input_ids[len(context) :]) == " 42 </think><|im_end|>"


@pytest.mark.parametrize(
    "turns, env, message",
    [
        ([{"role": "user", "text": "x"}], "python", "role' \\(assistant or tool\\)"),
        (
            [{"role": "assistant", "text": "x"}, {"role": "tool", "text": "y"}],
            "python",
            "ends with an assistant",
        ),
        ([{"role": "assistant", "text": "x"}], "pythn", "unknown environment 'pythn'"),
        ("x", "python", "non-empty list"),
    ],
)
def test_bad_episode_rows_are_one_error_with_the_row(tok, turns, env, message):
    with pytest.raises(DataError, match=f"row 1: .*{message}"):
        encode_sft_rows([{"prompt": "q", "env": env, "turns": turns}], tok, PLAIN, max_len=100)


def test_coldstart_pipeline_runs_tiny(tmp_path):
    """The shipped pipeline on tiny-random, shrunk to 2 RL steps: traces -> SFT -> RL with the tool."""
    cfg = yaml.safe_load((ROOT / "configs" / "pipelines" / "chain_sum_tool_coldstart.yaml").read_text())
    cfg.update(model="tiny-random", output_dir=str(tmp_path / "run"), dtype="fp32")
    cfg["task"].update(train_size=40, eval_size=4)
    traces, sft, rl = cfg["stages"]
    traces["prompts"] = 16
    sft.update(max_steps=2, batch_size=4, max_len=1200, progress=False)  # byte tokens: long prompts
    rl.update(max_steps=2, save_every=0, plot=False, progress=False, eval={"n": 2, "before": False})
    rl["rollout"].update(prompts_per_step=2, group_size=2, max_new_tokens=24)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["pipeline", str(path)]) == 0
    run = tmp_path / "run"
    data = rows(run / "01-tool_traces" / "data.jsonl")
    assert len(data) == 16 and all(len(r["turns"]) == 3 for r in data)
    assert [m["step"] for m in rows(run / "02-cold_start" / "metrics.jsonl")] == [1, 2]
    metrics = rows(run / "03-tool_rl" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2] and all("tool/calls_per_episode" in m for m in metrics)
    assert all("episode" in s for s in rows(run / "03-tool_rl" / "samples.jsonl"))
    assert (run / "03-tool_rl" / "final" / "config.json").is_file()
    after = rows(run / "03-tool_rl" / "evals.jsonl")[-1]
    assert after["label"] == "after" and "tool/episodes_with_call" in after


def test_a_prompt_without_the_think_prefill_gets_it_in_the_first_turn(tmp_path):
    task = tmp_path / "q.jsonl"
    task.write_text(
        "".join(json.dumps({"question": q, "answer": "5"}) + "\n" for q in ("2 + 3 =", "9 - 4 ="))
    )
    cfg = TracesConfig(
        output=str(tmp_path / "t.jsonl"),
        style="tool",
        task=TaskConfig(name=str(task), eval_size=0, template="plain", prefill=""),
    )
    write_traces(cfg)
    r = next(r for r in rows(tmp_path / "t.jsonl") if r["prompt"] == "2 + 3 =")
    assert r["turns"][0]["text"].startswith("<think> ") and r["turns"][0]["text"].endswith(
        "<python>print(2 + 3)</python>"
    )
    assert r["turns"][1]["text"] == "\n<output>\n5\n</output>\n"
    with pytest.raises(ConfigError, match="max_tool_calls must be >= 1"):
        TracesConfig(style="tool", env=EnvConfig(name="python", max_tool_calls=0)).validate()
