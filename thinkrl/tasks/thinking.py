"""Qwen3's thinking modes: one model that thinks when asked to and answers at once when not.

The Qwen3 technical report (2025, section 4.3, "thinking mode fusion") trains one model for
both behaviours. The user's turn ends with a soft switch, ``/think`` or ``/no_think``; in the
no-thinking mode the response still opens with a thinking block, left empty
(``<think></think>`` and then the answer), so both modes share one response format. Qwen3's
chat template also has a hard switch, ``enable_thinking=False``, which writes that empty
block into the prompt itself.

``task.thinking`` sets the mode of every example:

- ``on``: every question ends with `` /think``;
- ``off``: every question ends with `` /no_think``;
- ``switch``: a seeded ``task.think_share`` of the training questions are ``on``, the rest
  ``off`` (fixed per question, so a resumed run sees the same modes), and every held-out
  question is evaluated once in each mode, so the two modes are compared on the same questions.

The mode lives in the question text (the switch, which every prompt builder, sample file and
SFT set then carries along) and in ``example.meta["thinking"]`` (what the format reward and
the per-mode evaluation read). :func:`thinkrl.tasks.templates.render_prompt` turns the switch
into the template's ``enable_thinking`` flag where the chat template has one.
"""

from __future__ import annotations

import dataclasses
import random
import re

ON, OFF = "on", "off"
SWITCH = {ON: "/think", OFF: "/no_think"}
_ALIASES = {"on": ON, "think": ON, "off": OFF, "no_think": OFF, "switch": "switch"}
_TRAILING = re.compile(r"\s/(think|no_think)\s*$")


def normalise(setting: str | bool | None) -> str | None:
    """``task.thinking`` as one of on, off, switch (think / no_think are older spellings; YAML
    reads a bare ``on`` / ``off`` as true / false)."""
    if isinstance(setting, bool):
        return ON if setting else OFF
    return None if setting is None else _ALIASES[setting]


def question_mode(question: str) -> str | None:
    """The mode a question asks for: its trailing soft switch, else None."""
    m = _TRAILING.search(question)
    if m is None:
        return None
    return ON if m.group(1) == "think" else OFF


def with_mode(ex, mode: str):
    """A copy of example ``ex`` that asks for ``mode`` (its switch replaced if it had one)."""
    question = _TRAILING.sub("", ex.question)
    return dataclasses.replace(ex, question=f"{question} {SWITCH[mode]}", meta={**ex.meta, "thinking": mode})


def apply_modes(task, setting: str | None, share: float = 0.5, seed: int = 0) -> None:
    """Give the task's examples their thinking modes, in place (see the module docstring)."""
    setting = normalise(setting)
    if setting is None:
        return
    if setting in (ON, OFF):
        task.train = [with_mode(ex, setting) for ex in task.train]
        task.eval = [with_mode(ex, setting) for ex in task.eval]
        return
    rng = random.Random(seed * 7_919 + 17)
    task.train = [with_mode(ex, ON if rng.random() < share else OFF) for ex in task.train]
    task.eval = [with_mode(ex, m) for ex in task.eval for m in (ON, OFF)]


def empty_thinking(response: str) -> str:
    """A demonstration response in the no-thinking form: its thinking block emptied
    (``<think> 7 plus 8 is 15. </think> <answer> 15 </answer>`` ->
    ``<think> </think> <answer> 15 </answer>``)."""
    return re.sub(r"<think>.*?</think>", "<think> </think>", response, count=1, flags=re.DOTALL)
