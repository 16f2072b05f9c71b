"""Multi-turn episodes with a scripted policy: token bookkeeping, hand-worked loss masks,
episode ends and their reasons, and the trainer training on policy tokens only."""

import pytest
import torch

from thinkrl.config import EnvConfig, TaskConfig
from thinkrl.envs import build_env
from thinkrl.envs.decoders import Turn, cut_turn
from thinkrl.envs.episodes import run_episodes, to_rollout, tool_metrics
from thinkrl.models import build_tiny_tokenizer
from thinkrl.rollout import Rollout, SamplingParams
from thinkrl.sampling import Groups
from thinkrl.tasks import Example
from thinkrl.trainer.batch import policy_token_mask

PLAIN = TaskConfig(template="plain", prefill="")
EOS = 258  # <|im_end|> of the tiny tokenizer


def byte_ids(tok, text):
    """The ids of ``text`` one byte token each, as a policy sampling byte by byte would give them."""
    return [
        tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(tok(ch, add_special_tokens=False).input_ids))[0]
        for ch in text
    ]


class Scripted:
    """A fake policy: row r's k-th turn is ``scripts[r][k]`` (ids), cut by the real turn rules."""

    def __init__(self, tok, scripts):
        self.tok, self.scripts, self.seqs = tok, scripts, []

    def open(self, prompts):
        self.seqs = [list(p) for p in prompts]
        self.k = [0] * len(prompts)

    def turn(self, rows, budgets, params, stop):
        out = []
        for r, b in zip(rows, budgets):
            t = cut_turn(self.tok, self.scripts[r][self.k[r]], None, b, {EOS}, stop)
            self.k[r] += 1
            self.seqs[r] += t.ids
            out.append(Turn(t.ids, [-0.5] * len(t.ids), t.stopped))
        return out

    def extend(self, row, ids):
        self.seqs[row] += ids

    def close(self):
        pass


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(added=("</python>",))  # the closing tag is one token when text is encoded


def test_hand_worked_mask_where_reencoding_would_move_the_boundaries(tok):
    call = "<python>print(6*7)</python>"  # 8 + 10 + 9 = 27 bytes, sampled as 27 byte tokens
    answer = "<answer>42</answer>"  # 8 + 2 + 9 = 19 bytes, then EOS: 20 tokens
    t1, t2 = byte_ids(tok, call), byte_ids(tok, answer) + [EOS]
    env = build_env(EnvConfig(name="python"))
    dec = Scripted(tok, [[t1, t2]])
    [ep], _ = run_episodes(
        env, dec, tok, [Example("6*7?", "42")], PLAIN, 1, SamplingParams(max_new_tokens=200), 8
    )
    obs = "\n<output>\n42\n</output>\n"  # 1 + 8 + 1 + 2 + 1 + 9 + 1 = 23 bytes, encoded on its own: 23 tokens
    obs_ids = tok(obs, add_special_tokens=False).input_ids
    assert len(t1) == 27 and len(obs_ids) == 23 and len(t2) == 20
    assert ep.ids == t1 + obs_ids + t2
    assert ep.mask == [1] * 27 + [0] * 23 + [1] * 20
    assert ep.logps == [-0.5] * 27 + [0.0] * 23 + [-0.5] * 20  # behaviour log-probs on policy tokens only
    assert dec.seqs[0] == ep.prompt_ids + ep.ids  # the decoder continued from exactly these ids
    assert ep.reason == "answered" and ep.tool_calls() == 1
    # Encoding the episode's text again merges the 9 sampled bytes of "</python>" into one token:
    # 8 positions fewer, so a mask rebuilt from re-encoded turns would be off by 8 after the call.
    reencoded = tok(tok.decode(ep.ids, skip_special_tokens=False), add_special_tokens=False).input_ids
    assert len(reencoded) == 70 - 8
    rec = ep.record()
    assert [(t["role"], t["tokens"]) for t in rec["turns"]] == [
        ("assistant", 27),
        ("tool", 23),
        ("assistant", 20),
    ]
    assert rec["turns"][1]["text"] == obs and rec["turns"][1]["tool_status"] == "ok"
    assert (rec["policy_tokens"], rec["env_tokens"]) == (47, 23)
    assert ep.policy_text() == call + answer  # the reward sees the policy's text, not the tool's output


def run_scripted(tok, scripts, G=1, max_new_tokens=200, **env_kw):
    env = build_env(EnvConfig(name="python", **env_kw))
    exs = [Example(f"q{i}", "42") for i in range(len(scripts) // G)]
    eps, _ = run_episodes(
        env,
        Scripted(tok, scripts),
        tok,
        exs,
        PLAIN,
        G,
        SamplingParams(max_new_tokens=max_new_tokens),
        env.cfg.max_turns,
    )
    return eps


def test_episodes_end_each_at_its_own_turn_with_their_reasons(tok):
    call = byte_ids(tok, "<python>print(1)</python>")  # 25 tokens
    ans = byte_ids(tok, "<answer>1</answer>") + [EOS]
    loop = byte_ids(tok, "<python>while 1: pass</python>")
    eps = run_scripted(
        tok, [[ans], [call, ans], [call, call], [loop, ans]], G=2, max_tool_calls=1, call_timeout_s=1.0
    )
    assert [e.reason for e in eps] == ["answered", "answered", "tool_budget_exceeded", "answered"]
    assert [e.tool_calls() for e in eps] == [0, 1, 1, 1]
    assert [len(e.turns) for e in eps] == [1, 3, 3, 3]
    assert eps[2].turns[-1]["detail"] == "tool call 2 past env.max_tool_calls=1"
    assert eps[3].turns[1]["tool_status"] == "timeout" and "[killed" in eps[3].turns[1]["text"]
    ro = to_rollout(eps, with_logps=True)
    assert tool_metrics(ro) == {
        "tool/calls_per_episode": 0.75,
        "tool/episodes_with_call": 0.75,
        "tool/over_budget": 1,
        "tool/killed_calls": 1,
        "tool/policy_tokens_mean": (19 + (25 + 19) + (25 + 25) + (30 + 19)) / 4,
    }


def test_length_and_max_turns(tok):
    call = byte_ids(tok, "<python>print(1)</python>")  # 25 tokens; its observation is 22
    # budget 30: the call fits, its observation would not leave room: the episode ends at length
    [e] = run_scripted(tok, [[call]], max_new_tokens=30)
    assert e.reason == "length" and e.truncated and e.ids == call and e.mask == [1] * 25
    # budget 10: the turn itself is cut after 10 tokens
    [e] = run_scripted(tok, [[call]], max_new_tokens=10)
    assert e.reason == "length" and e.ids == call[:10]
    [e] = run_scripted(tok, [[call, call]], max_turns=2, max_tool_calls=5)
    assert e.reason == "max_turns" and e.tool_calls() == 2


def test_policy_token_mask_hand_worked():
    # rows: a 3-turn episode (2 policy, 2 tool, 1 policy) and a single turn of 2 tokens; T = 6
    ro = Rollout(
        prompt_ids=[[1], [1]],
        completion_ids=[[5, 6, 7, 8, 9], [5, 6]],
        texts=["", ""],
        truncated=[0, 0],
        loss_mask=[[1, 1, 0, 0, 1], [1, 1]],
    )
    lengths = torch.tensor([5, 2])
    mask = (torch.arange(6)[None] < lengths[:, None]).float() * policy_token_mask(ro, 6)
    assert mask.tolist() == [[1, 1, 0, 0, 1, 0], [1, 1, 0, 0, 0, 0]]
    single = Rollout(prompt_ids=[[1]], completion_ids=[[5, 6]], texts=[""], truncated=[0])
    assert policy_token_mask(single, 3).tolist() == [[1, 1, 1]]  # single-turn: the plain length mask decides


def test_dynamic_sampling_keeps_masks_and_episodes():
    ro = Rollout(
        prompt_ids=[[1]] * 4,
        completion_ids=[[2]] * 4,
        texts=[""] * 4,
        truncated=[False] * 4,
        loss_mask=[[1], [0], [1], [0]],
        episodes=[{"i": i} for i in range(4)],
    )
    g = Groups(["a", "b"], [("p", ""), ("p", "")], ro, [""] * 4, [0.0, 1.0, 1.0, 1.0], {})
    kept = g.select(g.varied())
    assert kept.ro.loss_mask == [[1], [0]] and kept.ro.episodes == [{"i": 0}, {"i": 1}]
    both = Groups.concat([kept, g.select([1])])
    assert both.ro.episodes == [{"i": i} for i in (0, 1, 2, 3)] and both.ro.logps is None
