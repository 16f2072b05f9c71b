"""The trainer on multi-turn episodes: only policy tokens train; `thinkrl train` with the python tool."""

import json
from pathlib import Path

import torch

from tests.trainer.test_rl import make_parts, weights
from thinkrl.cli import main
from thinkrl.envs import decoders
from thinkrl.envs.decoders import RePrefill, Turn, cut_turn
from thinkrl.rollout import Rollout, SamplingParams
from thinkrl.rollout.fast import FastEngine
from thinkrl.trainer.batch import policy_token_mask
from thinkrl.trainer.rl import policy_update

# Two groups of two episodes; completion = turn (2 tokens) | observation (2) | turn (1), T = 5
PROMPTS = [[72, 105, 33]] * 2 + [[49, 43, 49, 61]] * 2
COMPLETIONS = [[50, 51, 60, 61, 258], [52, 53, 60, 61, 258], [50, 32, 62, 63, 258], [55, 56, 62, 63, 258]]
LOSS_MASK = [[1, 1, 0, 0, 1]] * 4


def rollout():
    return Rollout(
        prompt_ids=PROMPTS,
        completion_ids=COMPLETIONS,
        texts=[""] * 4,
        truncated=[False] * 4,
        loss_mask=LOSS_MASK,
    )


def test_observation_tokens_get_no_gradient(tiny):
    """Advantages only on the observation columns 2-3: with the policy-token mask nothing trains
    (SGD, so no weight decay moves anything); with a plain length mask the same advantages do."""
    model, tok = tiny
    ro = rollout()
    adv = torch.zeros(4, 5)
    adv[:, 2:4] = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]])
    length_mask = torch.ones(4, 5)
    mask = length_mask * policy_token_mask(ro, 5)
    assert mask[0].tolist() == [1, 1, 0, 0, 1]
    before = weights(model)
    m = policy_update(
        make_parts(
            model, tok, optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0), loss="pg", max_grad_norm=1e9
        ),
        ro,
        adv,
        mask,
    )
    assert m["grad_norm"] == 0.0 and all(torch.equal(before[k], v) for k, v in weights(model).items())
    m = policy_update(
        make_parts(
            model, tok, optimizer=lambda ps: torch.optim.SGD(ps, lr=1.0), loss="pg", max_grad_norm=1e9
        ),
        ro,
        adv,
        length_mask,
    )
    assert m["grad_norm"] > 0


def test_reprefill_first_turn_is_the_engines_own_generation(tiny):
    """Greedy: a turn from ids equals engine.generate on the same prompt (tokens and log-probs),
    and a turn after an observation equals generating from the joined ids as a fresh prompt."""
    model, tok = tiny
    eng = FastEngine(model, tok, batch_size=4, bf16=False)
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    ro = eng.generate_text(["abc", "hello"], 1, params)
    dec = RePrefill(eng, tok)
    dec.open([list(p) for p in ro.prompt_ids])
    turns = dec.turn([0, 1], [6, 6], params, ())
    assert [t.ids for t in turns] == ro.completion_ids and [t.logps for t in turns] == ro.logps
    obs = [60, 61, 62]
    dec.extend(1, obs)
    [again] = dec.turn([1], [4], params, ())
    fresh = eng.generate(
        [ro.prompt_ids[1] + ro.completion_ids[1] + obs], 1, SamplingParams(max_new_tokens=4, temperature=0.0)
    )
    assert again.ids == fresh.completion_ids[0] and again.logps == fresh.logps[0]


BASE = [
    "train",
    "model=tiny-random",
    "rollout.max_new_tokens=64",
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
    "eval.n=2",
    "eval.before=false",
    "progress=false",
    "plot=false",
    "task.template=plain",
    "dtype=fp32",
    "task.train_size=20",
    "task.eval_size=4",
    "max_steps=2",
    "env.name=python",
    "log_samples=4",
]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def test_two_step_run_with_the_python_tool(tmp_path):
    """tiny-random's own garbage: the mechanics run, every sample is an episode record."""
    out = tmp_path / "run"
    assert main([*BASE, f"output_dir={out}", "rollout.max_new_tokens=16"]) == 0
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    assert all("tool/calls_per_episode" in m and "tool/over_budget" in m for m in metrics)
    assert all(s["episode"]["turns"][0]["role"] == "assistant" for s in read_jsonl(out / "samples.jsonl"))


class ScriptedPolicy(RePrefill):
    """The run's policy writes a tool call, then an answer that differs per row (so GRPO groups
    have an advantage); everything else (sync, the trainer, the sandbox) is the real path."""

    def open(self, prompts):
        super().open(prompts)
        self.k = [0] * len(prompts)

    def turn(self, rows, budgets, params, stop):
        out = []
        for r, b in zip(rows, budgets):
            text = "<python>print(6*7)</python>" if self.k[r] == 0 else f"<answer>{40 + r}</answer>"
            ids = [i for ch in text for i in self.tok(ch, add_special_tokens=False).input_ids] + [258]
            t = cut_turn(self.tok, ids, [-1.0] * len(ids), b, {258}, stop)
            self.k[r] += 1
            self.seqs[r] += t.ids
            out.append(Turn(t.ids, t.logps, t.stopped))
        return out


def test_two_step_run_with_tool_calls(tmp_path, monkeypatch, byte_sum_reward):
    monkeypatch.setattr(decoders, "RePrefill", ScriptedPolicy)
    out = tmp_path / "run"
    assert (
        main(
            [
                *BASE,
                f"output_dir={out}",
                f"rewards.{byte_sum_reward}=1.0",
                "env.max_tool_calls=1",
                "env.decoder=reprefill",
                "rollout.max_new_tokens=96",
            ]
        )
        == 0
    )
    metrics = read_jsonl(out / "metrics.jsonl")
    assert all(m["tool/calls_per_episode"] == 1.0 and m["tool/episodes_with_call"] == 1.0 for m in metrics)
    assert all(m["tool/over_budget"] == 0 for m in metrics)
    assert any(m["trained_seqs"] > 0 for m in metrics)
    s = read_jsonl(out / "samples.jsonl")[0]["episode"]
    assert [t["role"] for t in s["turns"]] == ["assistant", "tool", "assistant"]
    assert s["turns"][1]["text"] == "\n<output>\n42\n</output>\n" and s["reason"] == "answered"
    assert s["env_tokens"] == 23
    # the held-out evaluation runs in the environment too: the same policy, with its tool
    after = read_jsonl(out / "evals.jsonl")[-1]
    assert after["label"] == "after" and after["tool/calls_per_episode"] == 1.0 and after["n"] == 2
    rec = json.loads((out / "eval_after.json").read_text())["records"][0]
    assert [t["role"] for t in rec["episode"]["turns"]] == ["assistant", "tool", "assistant"]


def test_over_budget_episodes_say_so_in_samples(tmp_path, monkeypatch, byte_sum_reward):
    monkeypatch.setattr(decoders, "RePrefill", ScriptedPolicy)
    out = tmp_path / "run"
    assert (
        main(
            [
                *BASE,
                f"output_dir={out}",
                f"rewards.{byte_sum_reward}=1.0",
                "env.max_tool_calls=0",
                "env.decoder=reprefill",
                "eval.after=false",
                "max_steps=1",
            ]
        )
        == 0
    )
    [m] = read_jsonl(out / "metrics.jsonl")
    assert m["tool/over_budget"] == 4 and m["tool/calls_per_episode"] == 0.0  # 2 prompts x 2 episodes
    for s in read_jsonl(out / "samples.jsonl"):
        ep = s["episode"]
        assert ep["reason"] == "tool_budget_exceeded" and ep["tool_calls"] == 0
        assert ep["turns"][-1]["detail"] == "tool call 1 past env.max_tool_calls=0"


def test_thinkrl_eval_runs_in_the_environment(tmp_path, monkeypatch):
    monkeypatch.setattr(decoders, "RePrefill", ScriptedPolicy)
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "model=tiny-random",
                "env.name=python",
                "env.decoder=reprefill",
                "n=2",
                "task.template=plain",
                "task.eval_size=4",
                "task.train_size=4",
                "eval.max_new_tokens=96",
                f"output={out}",
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())["results"]["tiny-random"]
    assert res["summary"]["tool/calls_per_episode"] == 1.0 and res["summary"]["n"] == 2
    assert [t["role"] for t in res["records"][0]["episode"]["turns"]] == ["assistant", "tool", "assistant"]
