"""The ``python`` tool environment: tool-integrated reasoning with a Python interpreter.

The policy writes a program between ``<python>`` and ``</python>`` anywhere in its turn (a
Markdown fence inside the tags is allowed); the closing tag is a stop string, so the turn ends
there. The program runs in the sandbox (``thinkrl/sandbox``: namespaces, seccomp, rlimits)
with a per-call wall-clock/CPU limit (``env.call_timeout_s``) and address-space limit
(``env.call_memory_mb``); its stdout (and, when it fails, the end of its traceback), cut to
``env.max_output_chars``, comes back as the observation

    <output>
    ...
    </output>

and the policy continues. A call that loops or allocates too much is killed; the observation
says so and the episode goes on. Each call is a fresh interpreter: nothing carries over between
calls. A turn without a call ends the episode (reason ``answered``); a call past
``env.max_tool_calls`` ends it unrun (reason ``tool_budget_exceeded``). The task's rewards
judge the policy's own text (observations excluded: a tool's output cannot answer for the
model). The format follows ReTool (Feng et al. 2025), whose code turns alternate with
``<interpreter>`` results masked out of the loss.
"""

from __future__ import annotations

import math

from thinkrl.config import EnvConfig
from thinkrl.envs import question_messages, register
from thinkrl.sandbox import Limits, run_python

OPEN, CLOSE = "<python>", "</python>"
TOOL_PROMPT = (
    f"You can run Python code: write it between {OPEN} and {CLOSE}; what it prints comes back "
    "between <output> and </output>. Each program runs on its own, so print what you need."
)
KILLED = {
    "timeout": "killed: it ran past {t:g} s",
    "cpu_time": "killed: it used more than {t:g} s of CPU",
    "memory": "killed: it needed more than {m} MB of memory",
    "output_limit": "killed: it printed too much",
    "signal": "killed by a signal",
    "sandbox_error": "the sandbox could not run it",
}


def tool_call(turn: str) -> str | None:
    """The program of a turn that ends with a call (``<python> ... </python>``), else None."""
    body = turn.rstrip()
    if not body.endswith(CLOSE) or OPEN not in body:
        return None
    code = body[body.rindex(OPEN) + len(OPEN) : -len(CLOSE)]
    lines = code.strip("\n").splitlines()
    if lines and lines[0].lstrip().startswith("```"):  # a Markdown fence inside the tags
        lines = lines[1:]
        if lines and lines[-1].strip() == "```":
            lines = lines[:-1]
    return "\n".join(lines) + "\n"


def format_output(status: str, stdout: str, stderr: str, cfg: EnvConfig) -> str:
    """The observation text for one call's result, cut to ``cfg.max_output_chars``."""
    text = stdout
    if status != "ok":
        at = stderr.find('File "solution.py"')  # the program's own frames, not the sandbox runner's
        tail = (stderr[at:] if at >= 0 else stderr)[-300:].strip()
        if tail:
            text += ("\n" if text and not text.endswith("\n") else "") + tail
        if status in KILLED:
            text += f"\n[{KILLED[status].format(t=cfg.call_timeout_s, m=cfg.call_memory_mb)}]"
    text = text.strip("\n")
    cut = len(text) - cfg.max_output_chars
    if cut > 0:
        text = text[: cfg.max_output_chars] + f"\n[... {cut} more characters cut]"
    return f"\n<output>\n{text}\n</output>\n"


@register(
    "python", settings=("max_tool_calls", "max_turns", "call_timeout_s", "call_memory_mb", "max_output_chars")
)
class PythonEnv:
    multi_turn = True
    runs_code = True  # the trainer checks for sandbox isolation before the first step
    stop = (CLOSE,)

    def __init__(self, cfg: EnvConfig | None = None):
        self.cfg = cfg or EnvConfig(name="python")
        t = self.cfg.call_timeout_s
        self.limits = Limits(
            wall_s=t,
            cpu_s=max(1, math.ceil(t)),
            memory_mb=self.cfg.call_memory_mb,
            output_bytes=max(1 << 16, 8 * self.cfg.max_output_chars),
        )

    def reset(self, example) -> list[dict]:
        return [{"role": "system", "content": TOOL_PROMPT}, *question_messages(example)]

    def step(self, messages: list[dict], turn: str):
        code = tool_call(turn)
        if code is None:
            return None, None, True, {"reason": "answered"}
        calls = sum(m["role"] == "tool" for m in messages)
        if calls >= self.cfg.max_tool_calls:
            return (
                None,
                None,
                True,
                {
                    "reason": "tool_budget_exceeded",
                    "detail": f"tool call {calls + 1} past env.max_tool_calls={self.cfg.max_tool_calls}",
                },
            )
        res = run_python(code, limits=self.limits)
        obs = format_output(res.status, res.stdout, res.stderr, self.cfg)
        return obs, None, False, {"tool_status": res.status, "tool_seconds": round(res.seconds, 3)}
