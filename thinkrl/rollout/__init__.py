"""Rollout engines: prompt token ids in, sampled completions and their log-probs out.

Every engine is a registered backend (``rollout.backend=NAME``; :data:`ENGINES`) that follows
one protocol, :class:`Engine`:

- ``generate(prompt_ids, n, params) -> Rollout``: ``n`` samples per prompt, the ``n`` samples
  of one prompt next to each other, with each sampled token's log-prob;
- ``sync_weights(model)``: copy the trained model's weights in; the trainer calls it after
  each optimizer step, and an engine samples from the weights of its last sync;
- ``score(mb, temperature)``: optional, log-probs of given completions (the frozen KL
  reference); a backend without it leaves scoring to the model's forward pass.

``generate_text`` is the thin helper for text prompts. Nothing outside this package knows
which backend it holds (the trainer, eval and the pipelines only call the protocol).
"""

from __future__ import annotations

from thinkrl import device
from thinkrl.rollout import fast as _fast  # noqa: F401  (registers "fast")
from thinkrl.rollout.base import (
    ENGINES,
    MIN_SHARED_PREFIX,
    STOP_TAIL,
    Engine,
    Rollout,
    SamplingParams,
    cut_at_end,
    hits_stop,
    shared_prefix_len,
)
from thinkrl.rollout.hf import HFEngine  # registers "hf"

__all__ = [
    "ENGINES",
    "MIN_SHARED_PREFIX",
    "STOP_TAIL",
    "Engine",
    "HFEngine",
    "Rollout",
    "SamplingParams",
    "autocast",
    "build_engine",
    "build_scorer",
    "cut_at_end",
    "engine_on",
    "hits_stop",
    "shared_prefix_len",
]


def autocast(enabled: bool, dev: str = "cpu"):
    """bf16 autocast on ``dev``, or nothing (thinkrl/device.py)."""
    return device.autocast(enabled, dev)


def build_engine(name: str, model, tokenizer, *, batch_size: int, bf16: bool, device: str = "cpu") -> Engine:
    """The engine ``rollout.backend=name`` asks for, on ``device`` (where ``model`` already is).
    A backend may hand over to another one, with one log line saying why (``fast`` does for a
    model it cannot run exactly, and on CUDA), so that a new model never stops a run."""
    return ENGINES.get(name).build(model, tokenizer, batch_size=batch_size, bf16=bf16, device=device)


def engine_on(
    name: str, model, tokenizer, *, batch_size: int, dtype: str, device_name: str = "auto"
) -> Engine:
    """For the commands that only generate (eval, sample, difficulty): resolve the config's
    ``device`` and ``dtype``, put ``model`` there and build backend ``name``'s engine for it."""
    dev = device.resolve_device(device_name)
    device.setup(dev)
    return build_engine(
        name, model.to(dev), tokenizer, batch_size=batch_size, bf16=device.use_bf16(dtype, dev), device=dev
    )


def build_scorer(name: str, model, tokenizer, *, bf16: bool, device: str = "cpu") -> Engine | None:
    """Backend ``name``'s scorer for a frozen model (its own copy of the weights), or None."""
    return ENGINES.get(name).frozen_scorer(model, tokenizer, bf16=bf16, device=device)
