"""Multi-turn episodes: run them, keep their token bookkeeping, score them.

An episode's sequence after its prompt is the policy's turns and the environment's
observations, in order, as token ids::

    prompt | turn 1 (policy) | obs 1 (env) | turn 2 (policy) | ... | last turn (policy)
    mask:    1 1 ... 1         0 0 ... 0     1 1 ... 1               1 ... 1

Each piece is tokenized once, where it is made: turns are the sampled ids themselves,
observations are encoded on their own and appended. Nothing is ever re-encoded from text,
so the mask marks exactly the tokens the policy sampled, even where encoding the joined
text would merge tokens across a boundary (the bug class of TRL #5144 and verl #6921).
Behaviour log-probs exist for policy tokens only (0.0, masked, on observation tokens).

With the cache-append decoder (the fast engine) every episode goes at its own turn: all slots
that are writing a turn decode together, a slot whose turn ended waits out of the batch for
its environment step (a tool call in a thread pool) while the others go on, then rejoins with
the observation appended to its cache. With the re-prefill decoder episodes go in rounds: the
live ones take their next turn together, then their steps run concurrently. With GRPO the G
episodes of a prompt form its group; one reward per episode.
"""

from __future__ import annotations

import dataclasses
import os
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache

from thinkrl.rollout import Rollout, SamplingParams
from thinkrl.tasks.templates import render_prompt


@dataclass
class Episode:
    example: object
    prompt_ids: list[int]
    prefill: str
    messages: list[dict]
    ids: list[int] = field(default_factory=list)  # everything after the prompt
    mask: list[int] = field(default_factory=list)  # 1: a policy token (trained), 0: an environment token
    logps: list[float] = field(default_factory=list)  # behaviour log-probs; 0.0 on environment tokens
    turns: list[dict] = field(default_factory=list)  # {"role", "text", "start", "end", ...} per piece
    done: bool = False
    reason: str | None = None  # answered | tool_budget_exceeded | length | max_turns | the env's own
    reward: float | None = None  # the environment's reward, replacing the task's rewards when set
    truncated: bool = False

    def add_policy(self, ids: list[int], logps: list[float] | None, text: str) -> None:
        self.turns.append(
            {"role": "assistant", "text": text, "start": len(self.ids), "end": len(self.ids) + len(ids)}
        )
        self.ids += ids
        self.mask += [1] * len(ids)
        self.logps += logps if logps is not None else [0.0] * len(ids)
        self.messages.append({"role": "assistant", "content": text})

    def add_observation(self, ids: list[int], text: str, info: dict) -> None:
        self.turns.append(
            {"role": "tool", "text": text, "start": len(self.ids), "end": len(self.ids) + len(ids), **info}
        )
        self.ids += ids
        self.mask += [0] * len(ids)
        self.logps += [0.0] * len(ids)
        self.messages.append({"role": "tool", "content": text})

    def end(self, reason: str, **info) -> None:
        self.done, self.reason = True, reason
        if info:
            self.turns[-1].update(info)

    def policy_text(self) -> str:
        """What the rewards judge: the prefill and the policy's turns, observations left out."""
        return self.prefill + "".join(t["text"] for t in self.turns if t["role"] == "assistant")

    def tool_calls(self) -> int:
        return sum(t["role"] == "tool" for t in self.turns)

    def record(self) -> dict:
        """The episode for samples.jsonl: turn by turn, observations marked ``role: tool``."""
        return {
            "turns": [
                {k: v for k, v in t.items() if k not in ("start", "end")} | {"tokens": t["end"] - t["start"]}
                for t in self.turns
            ],
            "reason": self.reason,
            "tool_calls": self.tool_calls(),
            "policy_tokens": sum(self.mask),
            "env_tokens": len(self.mask) - sum(self.mask),
        }


def episode_prompt(messages: list[dict], tok, task_cfg) -> tuple[str, str]:
    """The prompt text and prefill of an episode's opening messages, through the task's template:
    a system message from the environment goes after the task's system prompt (chat template)
    or before the question (r1_zero and plain templates)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    question = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    cfg = task_cfg
    if system:
        if cfg.template == "chat":
            cfg = dataclasses.replace(
                cfg, system_prompt="\n\n".join(filter(None, [cfg.system_prompt, system]))
            )
        else:
            question = f"{system}\n\n{question}"
    return render_prompt(question, tok, cfg)


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    """Threads for environment steps: they mostly wait on sandbox processes."""
    return ThreadPoolExecutor(max_workers=max(2, 2 * (os.cpu_count() or 1)), thread_name_prefix="env")


def episode_seed(seed: int, index: int) -> int:
    """The sampling seed of episode ``index`` of a call seeded ``seed``."""
    return zlib.crc32(f"{seed}/episode/{index}".encode())


def run_episodes(
    env,
    decoder,
    tok,
    examples: list,
    task_cfg,
    G: int,
    params: SamplingParams,
    max_turns: int,
    seed: int | None = None,
) -> tuple[list[Episode], list[tuple[str, str]]]:
    """G episodes per example, all run to their end; returns them (rows g*G .. g*G+G-1 are
    example g's) and each example's rendered (prompt text, prefill).

    ``params.max_new_tokens`` bounds the whole episode after its prompt (turns and
    observations), so the trainer's [N, T] tensors stay as large as in a single-turn run.
    ``seed``: with the cache-append decoder each episode samples from its own stream
    (``episode_seed(seed, i)``), whatever the others do; with the re-prefill decoder the call
    runs from the random state ``seed``. None: the process's random state, as it is."""
    rendered = [episode_prompt(env.reset(ex), tok, task_cfg) for ex in examples]
    prompt_ids = [tok(r[0], add_special_tokens=False).input_ids for r in rendered]
    eps = [
        Episode(ex, prompt_ids[g], rendered[g][1], env.reset(ex))
        for g, ex in enumerate(examples)
        for _ in range(G)
    ]
    if getattr(decoder, "concurrent", False):
        _run_concurrent(env, decoder, tok, eps, params, max_turns, seed)
        return eps, rendered
    from thinkrl.device import seeded

    with seeded(seed, _device_of(decoder)):
        _run_rounds(env, decoder, tok, eps, params, max_turns)
    return eps, rendered


def _device_of(decoder) -> str:
    model = getattr(getattr(decoder, "engine", None), "model", None)
    try:
        return str(next(model.parameters()).device)
    except (AttributeError, StopIteration, TypeError):
        return "cpu"


def _run_rounds(env, decoder, tok, eps: list[Episode], params: SamplingParams, max_turns: int) -> None:
    """Episodes in rounds (the re-prefill decoder): the live ones take their next turn
    together, then their environment steps run concurrently."""
    budget = params.max_new_tokens
    decoder.open([e.prompt_ids for e in eps])
    try:
        for turn_no in range(max_turns):
            live = [i for i, e in enumerate(eps) if not e.done]
            if not live:
                break
            turns = decoder.turn(live, [budget - len(eps[i].ids) for i in live], params, env.stop)
            texts = [tok.decode(t.ids, skip_special_tokens=True) for t in turns]
            stepping = [k for k, t in enumerate(turns) if t.stopped != "length"]
            steps = dict(
                zip(stepping, _pool().map(lambda k: env.step(eps[live[k]].messages, texts[k]), stepping))
            )
            for k, (i, t) in enumerate(zip(live, turns)):
                obs_ids = after_turn(eps[i], t, texts[k], steps.get(k), tok, budget, turn_no == max_turns - 1)
                if obs_ids is not None:
                    decoder.extend(i, obs_ids)
    finally:
        decoder.close()


def after_turn(e: Episode, t, text: str, step, tok, budget: int, last_turn: bool) -> list[int] | None:
    """Record policy turn ``t`` of episode ``e`` and what the environment said to it (``step``:
    its ``(obs, reward, done, info)``; None for a turn cut by the token budget). Returns the
    observation's ids when the episode goes on, None when it ended."""
    e.add_policy(t.ids, t.logps, text)
    if t.stopped == "length":
        e.truncated = True
        e.end("length")
        return None
    obs, reward, done, info = step
    if done:
        e.reward = reward
        e.end(info.pop("reason", "done"), **info)
        return None
    obs_ids = tok(obs, add_special_tokens=False).input_ids
    if len(e.ids) + len(obs_ids) >= budget:  # no room for the observation and a turn after it
        e.truncated = True
        e.end("length", **info)
        return None
    e.add_observation(obs_ids, obs, info)
    if last_turn:
        e.end("max_turns")
        return None
    return obs_ids


def _run_concurrent(
    env, decoder, tok, eps: list[Episode], params: SamplingParams, max_turns: int, seed: int | None = None
) -> None:
    """Every episode at its own turn (``decoder``: a :class:`thinkrl.envs.decoders.CacheAppend`).

    Each decode step runs every slot that is writing a turn. A slot whose turn ends waits,
    out of the batch, for its environment step (a tool call in the thread pool), while the
    others go on decoding; when the step returns, its observation is appended to the slot's
    cache and the slot rejoins the batch. No episode waits for another's tool call."""
    from concurrent.futures import FIRST_COMPLETED, wait

    from thinkrl.envs.decoders import Turn

    budget = params.max_new_tokens
    dec = decoder.slots(len(eps), max(len(e.prompt_ids) for e in eps) + budget + 1)
    slot = {
        dec.add(
            e.prompt_ids,
            dataclasses.replace(params, max_new_tokens=budget),
            seed=None if seed is None else episode_seed(seed, i),
        ): i
        for i, e in enumerate(eps)
    }
    ids: dict[int, list[int]] = {i: [] for i in range(len(eps))}
    lps: dict[int, list[float]] = {i: [] for i in range(len(eps))}
    turns = [0] * len(eps)
    waiting: dict = {}  # future of an env step -> (episode, its turn)
    live = len(eps)

    def ended(i: int, s: int, stopped: str) -> None:
        nonlocal live
        t = Turn(ids[i], lps[i], stopped)
        ids[i], lps[i] = [], []
        text = tok.decode(t.ids, skip_special_tokens=True)
        if stopped == "length":
            after_turn(eps[i], t, text, None, tok, budget, False)
            dec.free(s)
            live -= 1
            return
        waiting[_pool().submit(env.step, eps[i].messages, text)] = (i, s, t, text)

    while live:
        emitted = dec.step()
        for em in emitted:
            i = slot[em.slot]
            ids[i].append(em.token)
            lps[i].append(em.logp)
            if em.finished:
                ended(i, em.slot, "eos" if em.reason == "stop" else "length")
            elif env.stop and decoder.hits(ids[i], env.stop):
                decoder.pause(dec, em.slot)
                ended(i, em.slot, "stop")
        if not waiting:
            if not emitted:  # every live episode must be decoding or waiting for its step
                raise RuntimeError(f"{live} episodes neither decode nor wait for the environment")
            continue
        # while some slot decodes, only collect steps that are done; else wait for the first one
        done, _ = wait(list(waiting), timeout=0 if emitted else None, return_when=FIRST_COMPLETED)
        for f in done:
            i, s, t, text = waiting.pop(f)
            turns[i] += 1
            obs_ids = after_turn(eps[i], t, text, f.result(), tok, budget, turns[i] == max_turns)
            if obs_ids is None:
                dec.free(s)
                live -= 1
            else:  # only the observation runs; the slot's history stays in its cache
                dec.extend(s, obs_ids, dataclasses.replace(params, max_new_tokens=budget - len(eps[i].ids)))


def to_rollout(eps: list[Episode], with_logps: bool) -> Rollout:
    return Rollout(
        prompt_ids=[e.prompt_ids for e in eps],
        completion_ids=[e.ids for e in eps],
        texts=[e.policy_text()[len(e.prefill) :] for e in eps],
        truncated=[e.truncated for e in eps],
        logps=[e.logps for e in eps] if with_logps else None,
        loss_mask=[e.mask for e in eps],
        episodes=[e.record() for e in eps],
    )


def score_episodes(
    rewards, eps: list[Episode], G: int, max_tokens: int
) -> tuple[list[str], list[float], dict]:
    """One reward per episode: the task's rewards on the policy's text, unless the
    environment gave the episode its own reward."""
    texts = [e.policy_text() for e in eps]
    totals, parts = rewards.score(
        texts,
        [e.example for e in eps],
        group_size=G,
        context={
            "num_tokens": [sum(e.mask) for e in eps],
            "max_tokens": max_tokens,
            "truncated": [e.truncated for e in eps],
        },
    )
    totals = [e.reward if e.reward is not None else t for e, t in zip(eps, totals)]
    return texts, totals, parts


def generate_and_score_episodes(
    engine, tok, env, rewards, cfg, examples: list, timings: dict, decoder=None, seeds=None
):
    """What the trainer's generate_and_score does, for a multi-turn environment: Groups of G
    scored episodes per example, their rollout carrying the loss mask and turn records.
    ``seeds`` as for single-turn rollouts: None (the process's random state), one int for
    the whole call (a rank's own stream under torchrun), or an iterator of per-group seeds
    (``distributed.seed_by_group``: one call per group, so a group's episodes depend on its
    seed alone, on whatever rank runs it)."""
    from thinkrl.envs.decoders import make_decoder
    from thinkrl.sampling import Groups

    G = cfg.rollout.group_size
    t0 = time.perf_counter()
    params = SamplingParams(
        max_new_tokens=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        top_k=cfg.rollout.top_k,
    )
    decoder = decoder or make_decoder(engine, tok, cfg.env.decoder)
    if seeds is None or isinstance(seeds, int):
        calls = [(examples, seeds)]
    else:
        calls = [([ex], next(seeds)) for ex in examples]
    eps, rendered = [], []
    for exs, seed in calls:
        e, r = run_episodes(env, decoder, tok, exs, cfg.task, G, params, cfg.env.max_turns, seed)
        eps += e
        rendered += r
    timings["time_generate"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    texts, totals, parts = score_episodes(rewards, eps, G, cfg.rollout.max_new_tokens)
    timings["time_score"] += time.perf_counter() - t0
    ro = to_rollout(eps, with_logps=not _is_hf(engine))
    return Groups(examples, rendered, ro, texts, totals, parts)


def _is_hf(engine) -> bool:
    from thinkrl.rollout import HFEngine

    return isinstance(engine, HFEngine)


def tool_metrics(ro: Rollout) -> dict:
    """Tool-call statistics of a step's episodes (logged per step; ``thinkrl report`` shows them)."""
    if not ro.episodes:
        return {}
    n = len(ro.episodes)
    calls = [e["tool_calls"] for e in ro.episodes]
    reasons = [e["reason"] for e in ro.episodes]
    killed = sum(
        t.get("tool_status") not in (None, "ok", "error")
        for e in ro.episodes
        for t in e["turns"]
        if t["role"] == "tool"
    )
    return {
        "tool/calls_per_episode": sum(calls) / n,
        "tool/episodes_with_call": sum(c > 0 for c in calls) / n,
        "tool/over_budget": sum(r == "tool_budget_exceeded" for r in reasons),
        "tool/killed_calls": killed,
        "tool/policy_tokens_mean": sum(e["policy_tokens"] for e in ro.episodes) / n,
    }


def evaluate_episodes(
    engine,
    tok,
    env,
    examples: list,
    cfg,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    reflection_words=(),
    **_,
) -> dict:
    """Held-out evaluation inside the environment (one episode per example, greedy by
    default): what :func:`thinkrl.eval.evaluate` reports, plus the tool statistics, so that a
    run with the tool is measured with the tool."""
    from thinkrl.config import ConfigError
    from thinkrl.envs.decoders import make_decoder
    from thinkrl.eval.metrics import reflection_stats
    from thinkrl.rewards import RewardModel

    if not examples:
        raise ConfigError(
            "no held-out examples to evaluate on: the task has no eval set (check eval.n, task.eval_size)"
        )
    t0 = time.perf_counter()
    eps, _ = run_episodes(
        env,
        make_decoder(engine, tok, cfg.env.decoder),
        tok,
        examples,
        cfg.task,
        1,
        SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature),
        cfg.env.max_turns,
    )
    seconds = time.perf_counter() - t0
    texts = [e.policy_text() for e in eps]
    _, parts = RewardModel({"accuracy": 1.0, "format": 1.0}).score(texts, examples)
    acc, fmt = parts["accuracy"], parts["format"]
    n = len(eps)
    lengths = [len(e.ids) for e in eps]
    ro = to_rollout(eps, with_logps=False)
    summary = {
        "n": n,
        "samples": 1,
        "accuracy": sum(acc) / n,
        "format_rate": sum(fmt) / n,
        "response_len_mean": sum(lengths) / n,
        "response_len_max": max(lengths),
        "truncation_rate": sum(e.truncated for e in eps) / n,
        **reflection_stats(texts, reflection_words),
        **tool_metrics(ro),
        "seconds": round(seconds, 2),
    }
    records = [
        {
            "question": ex.question,
            "answer": ex.answer,
            "completion": t,
            "correct": a,
            "format": f,
            "episode": rec,
        }
        for ex, t, a, f, rec in zip(examples, texts, acc, fmt, ro.episodes)
    ]
    return {"summary": summary, "records": records}
