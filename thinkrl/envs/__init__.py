"""Environments: an episode is a conversation between the policy and an environment.

The API is two calls (the shape of verl's agent loop, SkyRL-Gym and ``verifiers``, kept small):

    messages = env.reset(example)                       # the opening turns: [system?, user]
    obs, reward, done, info = env.step(messages, turn)  # after every policy turn

``messages`` is the conversation so far (``{"role", "content"}`` dicts; the policy's turns are
``assistant``, observations ``tool``); ``turn`` is the text of the policy turn just produced,
not yet in ``messages``. ``obs`` is text that continues the sequence after the turn, or None
when ``done``. ``reward``: None lets the task's configured rewards judge the episode's policy
text (``rewards.*``); a number replaces them for this episode. ``info`` goes to the episode's
sample record (``reason`` says why an episode ended).

An environment is stateless between calls (whatever it counts, it reads from ``messages``),
so many episodes share one instance and run concurrently, each at its own turn. The stop
strings it declares end a policy turn early (a tool call); EOS always ends one.

Registered by name (``ENVS``) and chosen with ``env.name``; each declares the ``env.*``
settings it reads when it registers. ``single_turn`` is the trivial environment: one policy
turn, then done; the trainer runs it through the plain ``engine.generate`` path, so existing
recipes are unchanged.
"""

from __future__ import annotations

from typing import Protocol

from thinkrl.config import ConfigError, EnvConfig
from thinkrl.registry import Registry


class Env(Protocol):
    multi_turn: bool  # False: one policy turn per episode (the plain rollout path)
    stop: tuple[str, ...]  # strings that end a policy turn besides EOS

    def reset(self, example) -> list[dict]: ...

    def step(self, messages: list[dict], turn: str) -> tuple[str | None, float | None, bool, dict]: ...


ENVS: Registry = Registry("environment")
# name -> the env.* settings it reads (besides name); checked by validate_env
SETTINGS: dict[str, tuple[str, ...]] = {}


def register(name: str, settings: tuple[str, ...] = ()):
    """Register an environment class under ``name``; ``settings`` are the ``env.*`` keys it reads."""
    deco = ENVS.register(name)

    def wrap(cls):
        SETTINGS[name] = settings
        return deco(cls)

    return wrap


def question_messages(example) -> list[dict]:
    return [{"role": "user", "content": example.question}]


@register("single_turn")
class SingleTurn:
    """One policy turn; the task's rewards judge it."""

    multi_turn = False
    stop: tuple[str, ...] = ()

    def __init__(self, cfg: EnvConfig | None = None):
        self.cfg = cfg

    def reset(self, example) -> list[dict]:
        return question_messages(example)

    def step(self, messages: list[dict], turn: str):
        return None, None, True, {"reason": "answered"}


def build_env(cfg: EnvConfig):
    from thinkrl.envs import python  # noqa: F401  (registers the python tool environment)

    return ENVS.get(cfg.name)(cfg)


def validate_env(cfg: EnvConfig) -> None:
    """One ConfigError for a bad ``env`` section."""
    from thinkrl.envs import python  # noqa: F401

    ENVS.check(cfg.name)
    if cfg.max_tool_calls < 0:
        raise ConfigError("env.max_tool_calls must be >= 0")
    if cfg.call_timeout_s <= 0:
        raise ConfigError("env.call_timeout_s must be > 0 (seconds of wall clock per tool call)")
    if cfg.call_memory_mb < 16:
        raise ConfigError(
            "env.call_memory_mb must be >= 16 (a Python interpreter needs that much address space)"
        )
    if cfg.max_output_chars < 1:
        raise ConfigError("env.max_output_chars must be >= 1")
    if cfg.decoder not in ("auto", "cache", "reprefill"):
        raise ConfigError(f"env.decoder '{cfg.decoder}' unknown; choose from: auto, cache, reprefill")
    if cfg.max_turns < 1:
        raise ConfigError("env.max_turns must be >= 1")
