"""The reward registry, the two kinds of reward, answer extraction and user reward files.

A *sample* reward scores one completion::

    fn(completion: str, example: Example, *, <context>..., <options>...) -> float | None

A *group* reward (``@group_reward``) scores the G completions of one prompt together, because its
value depends on the others (Kimi k1.5's length reward)::

    fn(completions: list[str], examples: list[Example], *, <context lists>..., <options>...) -> list[float]

Keyword-only parameters are filled by name: per-completion *context* from the trainer
(``num_tokens``, ``max_tokens``, ``truncated``; lists for group rewards) and *options* from the
config (``reward_args: {code: {mode: fraction}}``). A reward that cannot judge returns ``None``;
one that fails for a reason worth counting (a timeout, a crashed program) raises
:class:`RewardFailure`; both score 0 and are counted by ``RewardModel``.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
from pathlib import Path

from thinkrl.config import ConfigError
from thinkrl.registry import Registry

REWARDS: Registry = Registry("reward")
CONTEXT_KEYS = ("num_tokens", "max_tokens", "truncated")


class RewardFailure(Exception):
    """The reward could not be computed for a countable reason (``timeout``, ``memory``, ...)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def group_reward(fn):
    """Mark ``fn`` as a group reward: ``(completions, examples) -> list[float]`` per prompt group."""
    fn.group = True
    return fn


def parallel(fn):
    """Mark ``fn`` as slow and thread-safe (it waits on a sandbox): ``RewardModel`` fans it out."""
    fn.parallel = True
    return fn


# ---------------------------------------------------------------------------
# Extraction

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)


def extract_answer(completion: str) -> str | None:
    """The text inside the last ``<answer>...</answer>``, stripped; None if there is none."""
    found = _ANSWER.findall(completion)
    return found[-1].strip() if found else None


def extract_boxed(text: str) -> str | None:
    r"""The content of the last ``\boxed{...}`` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def extract_final(completion: str) -> str | None:
    r"""The final answer: ``<answer>`` content (a ``\boxed{}`` inside it wins), else the last ``\boxed{}``."""
    ans = extract_answer(completion)
    if ans is not None:
        return extract_boxed(ans) or ans
    return extract_boxed(completion)


def extract_thinking(completion: str) -> str:
    """The chain of thought: the ``<think>`` block, else everything before ``<answer>``."""
    m = _THINK.search(completion)
    if m:
        return m.group(1)
    cut = completion.find("<answer>")
    return completion if cut < 0 else completion[:cut]


# ---------------------------------------------------------------------------
# User rewards: "path/to/file.py:function"

_USER = re.compile(r"^(?P<path>.+\.py):(?P<fn>[A-Za-z_]\w*)$")
_loaded: dict[str, object] = {}


def load_user_reward(ref: str):
    """Import ``fn`` from ``path.py`` once (cached by absolute path and name)."""
    m = _USER.match(ref)
    if not m:
        raise ConfigError(f"reward '{ref}': expected a registered name or path/to/file.py:function")
    path = Path(m["path"]).expanduser().resolve()
    key = f"{path}:{m['fn']}"
    if key in _loaded:
        return _loaded[key]
    if not path.is_file():
        raise ConfigError(f"reward '{ref}': file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"thinkrl_user_rewards_{abs(hash(str(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"reward '{ref}': importing {path} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, m["fn"], None)
    if not callable(fn):
        names = sorted(n for n, v in vars(module).items() if inspect.isfunction(v) and not n.startswith("_"))
        raise ConfigError(
            f"reward '{ref}': {path} has no function '{m['fn']}'; functions there: "
            f"{', '.join(names) or '(none)'}"
        )
    _loaded[key] = fn
    return fn


def resolve(name: str):
    """A registered reward by name, a reward model ``rm:PATH``, or a user reward ``file.py:function``."""
    if name.startswith("rm:"):
        from thinkrl.rewards.learned import rm_at

        return rm_at(name[len("rm:") :])
    if _USER.match(name):
        return load_user_reward(name)
    return REWARDS.get(name)


def keyword_params(fn) -> set[str]:
    return {p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY}


def check_options(name: str, fn, options: dict) -> None:
    """Options given in ``reward_args`` must be keyword-only parameters of the reward."""
    valid = keyword_params(fn) - set(CONTEXT_KEYS)
    for key in options:
        if key not in valid:
            raise ConfigError(
                f"reward_args.{name}.{key}: unknown option; "
                f"'{name}' takes: {', '.join(sorted(valid)) or 'no options'}"
            )
