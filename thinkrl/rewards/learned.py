"""Learned and generative rewards: a Bradley-Terry reward model, and an LLM judge.

``rm``: a reward model trained by ``thinkrl rm`` scores each prompt + completion, in batches,
without gradients. Choose it with ``rewards.rm=1.0 reward_args.rm.path=runs/rm/final``, or as
``rm:PATH`` in a YAML ``rewards`` mapping. Options:

- ``normalize``: ``none``; ``group`` (the G scores of a prompt minus their mean, over their std);
  or ``running`` (minus the running mean, over the running std, of every score so far).
- ``apply_to``: ``all``, or ``no_answer``. With ``no_answer``, examples that have a reference
  answer score 0 here, and the rule-based rewards judge them. That is DeepSeek-R1's stage 4:
  rules on reasoning prompts, a reward model on general ones.
- ``device``: where the reward model runs, ``auto`` (the default: this process's GPU where
  there is one, as for the engine, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.

Under ``distributed.backend=ray`` every rollout worker (a Ray actor) loads its own copy of the
reward model beside its engine and scores its groups there, in the workers, not the learner.
``normalize=running`` then keeps one running mean and std per worker.

``judge``: an OpenAI-compatible endpoint (any server, ``thinkrl serve`` included) is asked, with
a template, whether the prediction matches the reference (``mode=verdict``), or to grade it
(``mode=grade``). The verdict is parsed strictly from the reply's last line. ``VERDICT: CORRECT``
or ``VERDICT: INCORRECT``; ``GRADE: g/10``. A reply in any other form is no verdict: it scores
None, which is skipped and counted, and never 1. Every call has a timeout and a number of
retries. Calls to one endpoint run at most ``max_concurrency`` at a time, and verdicts are
cached per (endpoint, model, prompt).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
import urllib.error
import urllib.request
from functools import lru_cache
from pathlib import Path

import torch

from thinkrl.config import ConfigError
from thinkrl.rewards.base import REWARDS, RewardFailure, extract_answer, group_reward, parallel

# ---------------------------------------------------------------------------
# Reward models


@lru_cache(maxsize=4)
def load_reward_model(path: str, device: str = "auto"):
    """``(model, tokenizer, task config)`` of a ``thinkrl rm`` folder, in eval mode, frozen, on
    ``device`` (auto | cpu | cuda | cuda:N; auto: this process's GPU where there is one)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from thinkrl.config import TaskConfig
    from thinkrl.device import resolve_device
    from thinkrl.trainer.rm import RM_FILE

    _check_rm_folder(path)
    folder = Path(path)
    meta = json.loads((folder / RM_FILE).read_text())
    rm = AutoModelForSequenceClassification.from_pretrained(folder).eval().requires_grad_(False)
    rm = rm.to(resolve_device(device))
    tok = AutoTokenizer.from_pretrained(folder)
    return rm, tok, TaskConfig(**meta["task"])


@torch.no_grad()
def rm_scores(
    path: str, questions: list[str], completions: list[str], batch_size: int = 16, device: str = "auto"
) -> list[float]:
    """The reward model's score of each (question, completion), rendered as in training."""
    from thinkrl.data import encode_prompt_completion
    from thinkrl.trainer.rm import scores

    rm, tok, task_cfg = load_reward_model(path, device)
    seqs = [encode_prompt_completion(q, c, tok, task_cfg).input_ids for q, c in zip(questions, completions)]
    out: list[float] = []
    for s in range(0, len(seqs), batch_size):
        out += scores(rm, seqs[s : s + batch_size], tok.pad_token_id).tolist()
    return out


class RunningStats:
    """Mean and variance of every value seen (Welford's algorithm)."""

    def __init__(self):
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: list[float]) -> None:
        for v in values:
            self.n += 1
            d = v - self.mean
            self.mean += d / self.n
            self.m2 += d * (v - self.mean)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else 1.0


_running: dict[str, RunningStats] = {}


def normalized(values: list[float], how: str, key: str, eps: float = 1e-6) -> list[float]:
    if how == "none":
        return values
    if how == "group":
        t = torch.tensor(values)
        std = float(t.std()) if len(values) > 1 else 1.0
        return ((t - t.mean()) / (std + eps)).tolist()
    if how == "running":
        stats = _running.setdefault(key, RunningStats())
        stats.update(values)
        return [(v - stats.mean) / (stats.std + eps) for v in values]
    raise ValueError(f"rm reward: normalize must be none, group or running, got {how!r}")


@REWARDS.register("rm")
@group_reward
def rm(
    completions: list[str],
    examples: list,
    *,
    path: str = "",
    normalize: str = "none",
    apply_to: str = "all",
    batch_size: int = 16,
    device: str = "auto",
) -> list[float]:
    """A ``thinkrl rm`` reward model's scores of one prompt's completions (see module docstring)."""
    if apply_to not in ("all", "no_answer"):
        raise ValueError(f"rm reward: apply_to must be all or no_answer, got {apply_to!r}")
    if apply_to == "no_answer" and all(str(ex.answer).strip() for ex in examples):
        return [0.0] * len(completions)  # the rules judge these
    raw = rm_scores(path, [ex.question for ex in examples], completions, batch_size, device)
    values = normalized(raw, normalize, path)
    if apply_to == "no_answer":
        values = [0.0 if str(ex.answer).strip() else v for v, ex in zip(values, examples)]
    return values


def _check_rm_folder(path: str) -> None:
    from thinkrl.trainer.rm import RM_FILE

    if not path:
        raise ConfigError("the rm reward needs reward_args.rm.path (a `thinkrl rm` output folder)")
    if not (Path(path) / RM_FILE).is_file():
        raise ConfigError(f"reward model {path}: not a `thinkrl rm` output folder (no {RM_FILE})")


rm.validate = lambda options: _check_rm_folder(str(options.get("path", "")))


def rm_at(path: str):
    """The ``rm`` reward bound to ``path`` (the ``rm:PATH`` form of a reward name)."""

    def bound(
        completions,
        examples,
        *,
        normalize: str = "none",
        apply_to: str = "all",
        batch_size: int = 16,
        device: str = "auto",
    ):
        return rm(
            completions,
            examples,
            path=path,
            normalize=normalize,
            apply_to=apply_to,
            batch_size=batch_size,
            device=device,
        )

    bound.group = True
    bound.validate = lambda options: _check_rm_folder(path)
    bound.__doc__ = f"the reward model at {path}"
    return bound


# ---------------------------------------------------------------------------
# An LLM judge over HTTP

VERDICT_TEMPLATE = (
    "You are grading an answer to a question against the reference answer.\n\n"
    "Question:\n{question}\n\nReference answer:\n{reference}\n\nAnswer to grade:\n{prediction}\n\n"
    "Does the answer to grade mean the same as the reference answer? Reply with exactly one line: "
    "VERDICT: CORRECT or VERDICT: INCORRECT"
)
GRADE_TEMPLATE = (
    "You are grading an answer to a question against the reference answer.\n\n"
    "Question:\n{question}\n\nReference answer:\n{reference}\n\nAnswer to grade:\n{prediction}\n\n"
    "Grade the answer from 0 (wrong) to 10 (fully right). Reply with exactly one line: GRADE: <n>/10"
)
_VERDICT = re.compile(r"^VERDICT:\s*(CORRECT|INCORRECT)$")
_GRADE = re.compile(r"^GRADE:\s*(\d+(?:\.\d+)?)\s*/\s*10$")


def parse_verdict(reply: str, mode: str) -> float | None:
    """1.0 / 0.0 (verdict) or g/10 (grade) from the reply's last non-empty line; else None."""
    lines = [ln.strip() for ln in str(reply).strip().splitlines() if ln.strip()]
    if not lines:
        return None
    last = lines[-1]
    if mode == "verdict":
        m = _VERDICT.match(last)
        return None if m is None else (1.0 if m.group(1) == "CORRECT" else 0.0)
    m = _GRADE.match(last)
    if m is None:
        return None
    g = float(m.group(1))
    return g / 10 if 0 <= g <= 10 else None


_limits: dict[tuple, threading.BoundedSemaphore] = {}
_limits_lock = threading.Lock()
_cache: dict[tuple, str] = {}


def _semaphore(url: str, n: int) -> threading.BoundedSemaphore:
    with _limits_lock:
        return _limits.setdefault((url, n), threading.BoundedSemaphore(n))


def ask(
    url: str, model: str, prompt: str, *, timeout: float, retries: int, api_key: str, max_concurrency: int
) -> str:
    """The assistant message's ``content`` for one user ``prompt``; RewardFailure after retries."""
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0.0,
            "max_tokens": 256,
        }
    ).encode()
    headers = {
        "Content-Type": "application/json",
        **({"Authorization": f"Bearer {api_key}"} if api_key else {}),
    }
    last = "judge_error"
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(2.0, 0.1 * 2**attempt))
        req = urllib.request.Request(url.rstrip("/") + "/chat/completions", data=body, headers=headers)
        try:
            with _semaphore(url, max_concurrency), urllib.request.urlopen(req, timeout=timeout) as resp:
                reply = json.loads(resp.read())
            return str(reply["choices"][0]["message"].get("content") or "")
        except TimeoutError:
            last = "timeout"
        except urllib.error.URLError as e:
            last = "timeout" if isinstance(e.reason, TimeoutError) else "judge_error"
        except (ValueError, KeyError, IndexError, TypeError, OSError):
            last = "judge_error"
    raise RewardFailure(last)


@REWARDS.register("judge")
@parallel
def judge(
    completion: str,
    example,
    *,
    url: str = "http://127.0.0.1:8000/v1",
    model: str = "",
    mode: str = "verdict",
    template: str = "",
    timeout: float = 30.0,
    retries: int = 2,
    api_key: str = "",
    max_concurrency: int = 4,
    cache: bool = True,
) -> float | None:
    """An OpenAI-compatible endpoint's verdict on the completion's answer (see module docstring)."""
    if mode not in ("verdict", "grade"):
        raise ValueError(f"judge reward: mode must be verdict or grade, got {mode!r}")
    prediction = extract_answer(completion)
    if prediction is None:
        return 0.0  # nothing to judge
    prompt = (template or (VERDICT_TEMPLATE if mode == "verdict" else GRADE_TEMPLATE)).format(
        question=example.question, reference=example.answer, prediction=prediction
    )
    key = (url, model, prompt)
    reply = _cache.get(key) if cache else None
    if reply is None:
        reply = ask(
            url,
            model,
            prompt,
            timeout=timeout,
            retries=retries,
            api_key=api_key,
            max_concurrency=max_concurrency,
        )
        if cache:
            _cache[key] = reply
    return parse_verdict(reply, mode)
