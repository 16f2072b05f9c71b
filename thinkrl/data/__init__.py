"""Supervised and preference data: JSONL in and out, and chat-format tokenisation.

Two SFT row formats are read:

- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the
  tokenizer's own chat template; the loss covers the assistant turns only (a
  message with ``"weight": 0``, e.g. a few-shot demonstration, is context only).
- ``{"prompt": question, "completion": response}``: the prompt is rendered with
  the task template (``render_prompt``, the same text RL and eval feed the model)
  and the completion (which starts with ``<think>``) is the response.
- ``{"prompt": question, "env": name, "turns": [{"role", "text"}, ...]}``: a multi-turn
  episode (the ``traces`` stage's tool style, or an RL episode record), encoded as the RL
  rollout of environment ``env`` sees it (``encode_episode``): the prompt with the
  environment's system prompt, then each turn; the loss covers the ``assistant`` turns
  only, never a ``tool`` observation.

Preference rows are ``{"prompt": question, "chosen": response, "rejected": response}``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from thinkrl.tasks import DataError
from thinkrl.tasks.templates import render_prompt

IGNORE = -100  # label of a token that is context, not a target


def read_rows(path: str | Path, need: tuple[str, ...] | None = None) -> list[dict]:
    """JSON objects, one per line; a missing file or a broken line is one DataError."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{n}: not valid JSON ({e.msg}); fix or remove that line") from None
        if not isinstance(row, dict):
            raise DataError(f"{p}:{n}: each line must be a JSON object")
        if need and not all(k in row for k in need):
            raise DataError(f"{p}:{n}: each line needs the fields {', '.join(need)}")
        rows.append(row)
    if not rows:
        raise DataError(f"{p} holds no rows")
    return rows


def write_rows(path: str | Path, rows: list[dict]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.rename(p)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE on context tokens, else the token itself (shifted at loss time)


def encode_messages(messages: list[dict], tok) -> Encoded:
    """Render turn by turn with the chat template; assistant segments are targets.

    Each turn's text is the difference between the template applied to the first
    i+1 messages and to the first i (with the generation prompt before an
    assistant turn), so the assistant header stays context and the end-of-turn
    token is a target: the model learns to stop.
    """
    ids: list[int] = []
    labels: list[int] = []
    prev = ""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError("each message needs 'role' and 'content'")
        bare = [{"role": x["role"], "content": x["content"]} for x in messages[: i + 1]]
        if m["role"] == "assistant":
            head = tok.apply_chat_template(bare[:-1], tokenize=False, add_generation_prompt=True)
            _extend(ids, labels, tok, _suffix(head, prev), train=False)
            prev = head
        text = tok.apply_chat_template(bare, tokenize=False)
        train = m["role"] == "assistant" and m.get("weight", 1) != 0
        _extend(ids, labels, tok, _suffix(text, prev), train=train)
        prev = text
    return Encoded(ids, labels)


def _suffix(text: str, prev: str) -> str:
    if not text.startswith(prev):
        raise DataError(
            "the tokenizer's chat template does not render conversations incrementally; "
            "use prompt/completion rows instead"
        )
    return text[len(prev) :]


def _extend(ids: list[int], labels: list[int], tok, text: str, *, train: bool) -> None:
    new = tok(text, add_special_tokens=False).input_ids if text else []
    ids += new
    labels += new if train else [IGNORE] * len(new)


def encode_prompt_completion(prompt: str, completion: str, tok, task_cfg) -> Encoded:
    """Task-template prompt as context; the completion plus EOS as target."""
    text, prefill = render_prompt(prompt, tok, task_cfg)
    context = text[: len(text) - len(prefill)] if prefill else text
    ctx = tok(context, add_special_tokens=False).input_ids
    tgt = tok(completion, add_special_tokens=False).input_ids + [tok.eos_token_id]
    return Encoded(ctx + tgt, [IGNORE] * len(ctx) + tgt)


def encode_episode(prompt: str, env_name: str, turns: list, tok, task_cfg) -> Encoded:
    """A multi-turn episode, token for token as the RL rollout builds it (thinkrl/envs/episodes.py):

        episode prompt (context) | turn 1 (target) | obs 1 (context) | turn 2 (target) | EOS (target)

    The prompt is ``episode_prompt(env.reset(example))``, the very text RL and eval render
    (the environment's system prompt included, the task's prefill at its end), so train and
    test prompts match. Each turn is encoded on its own, as RL appends an observation's ids;
    joined text is never re-encoded, so no token straddles a turn boundary and the mask
    follows the turns exactly. ``turns`` follow the prefill (an RL episode record's turns);
    the episode must start and end with an ``assistant`` turn."""
    from thinkrl.envs.episodes import episode_prompt
    from thinkrl.tasks import Example

    if not isinstance(turns, list) or not turns:
        raise DataError("'turns' must be a non-empty list of {role, text}")
    for t in turns:
        if (
            not isinstance(t, dict)
            or t.get("role") not in ("assistant", "tool")
            or not isinstance(t.get("text"), str)
        ):
            raise DataError("each turn needs 'role' (assistant or tool) and a string 'text'")
    if turns[0]["role"] != "assistant" or turns[-1]["role"] != "assistant":
        raise DataError("an episode starts and ends with an assistant turn")
    text, _ = episode_prompt(_env(env_name).reset(Example(prompt, "")), tok, task_cfg)
    ids = tok(text, add_special_tokens=False).input_ids
    labels = [IGNORE] * len(ids)
    for t in turns:
        _extend(ids, labels, tok, t["text"], train=t["role"] == "assistant")
    ids.append(tok.eos_token_id)  # the policy's last turn ends with EOS: it learns to stop
    labels.append(tok.eos_token_id)
    return Encoded(ids, labels)


@lru_cache(maxsize=8)
def _env(name: str):
    """The registered environment ``name`` (with its default settings: its reset reads none)."""
    from thinkrl.config import ConfigError, EnvConfig
    from thinkrl.envs import build_env

    try:
        return build_env(EnvConfig(name=str(name)))
    except ConfigError as e:
        raise DataError(f"'env': {e}") from None


def encode_sft_rows(rows: list[dict], tok, task_cfg, max_len: int, source: str = "data") -> list[Encoded]:
    """Encode every row; rows longer than ``max_len`` tokens are cut, rows left with no target dropped."""
    out = []
    for n, row in enumerate(rows, 1):
        if "messages" in row:
            if not isinstance(row["messages"], list):
                raise DataError(f"{source}: row {n}: 'messages' must be a list")
            try:
                enc = encode_messages(row["messages"], tok)
            except DataError as e:
                raise DataError(f"{source}: row {n}: {e}") from None
        elif "turns" in row and "prompt" in row:
            try:
                enc = encode_episode(
                    str(row["prompt"]), row.get("env", "single_turn"), row["turns"], tok, task_cfg
                )
            except DataError as e:
                raise DataError(f"{source}: row {n}: {e}") from None
        elif "prompt" in row and "completion" in row:
            enc = encode_prompt_completion(str(row["prompt"]), str(row["completion"]), tok, task_cfg)
        else:
            raise DataError(
                f"{source}: row {n} needs 'messages', 'prompt' and 'completion', or 'prompt' and 'turns'"
            )
        enc = Encoded(enc.input_ids[:max_len], enc.labels[:max_len])
        if any(t != IGNORE for t in enc.labels[1:]):
            out.append(enc)
    if not out:
        raise DataError(f"{source}: no row has a target token within max_len={max_len}")
    return out


def length_buckets(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Batches of similar length (little padding), in a seeded random order of batches."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    random.Random(seed).shuffle(batches)
    return batches
