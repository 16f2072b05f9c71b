"""``thinkrl chat model=PATH``: talk to a model in the terminal.

Replies stream token by token; the thinking (``<think>`` ... ``</think>``) is printed dimmed
and apart from the answer. Commands: ``/think`` and ``/no_think`` (the template's
``enable_thinking``, as on the server), ``/budget N`` (a thinking budget; ``/budget off``),
``/reset`` (forget the conversation), ``/exit``. Ctrl-C stops the reply being written, not
the program. The conversation is multi-turn: earlier turns' answers (not their thinking)
go back into the prompt, as chat templates of thinking models expect.

The same batching loop as ``thinkrl serve`` runs the model (one slot), so the chat and the
server sample, stop and budget alike.
"""

from __future__ import annotations

import queue
import signal
import sys
import time
from dataclasses import dataclass

from thinkrl.config import ConfigError

HELP = (
    "commands: /think, /no_think (thinking mode), /budget N | off (thinking budget), /reset (new conversation), "
    "/exit; Ctrl-C stops a reply"
)


@dataclass
class ChatConfig:
    model: str = ""
    thinking: str = "auto"  # auto (the template's default) | on | off; /think and /no_think switch it
    budget: int = -1  # thinking budget in tokens; -1: none
    max_tokens: int = 1024
    min_tokens: int = 0  # end-of-sequence banned before this many tokens (mostly for tests)
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int = -1  # -1: unseeded
    system: str = ""  # a system prompt
    dtype: str = "auto"
    backend: str = "fast"
    color: str = "auto"  # auto | always | never

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("thinkrl chat needs model=PATH (a built-in name, an HF folder or a .gguf file)")
        if self.thinking not in ("auto", "on", "off"):
            raise ConfigError(f"thinking must be auto, on or off, got {self.thinking!r}")
        if self.color not in ("auto", "always", "never"):
            raise ConfigError(f"color must be auto, always or never, got {self.color!r}")
        if self.budget < -1 or self.max_tokens < 1:
            raise ConfigError("budget must be >= 0 (or -1 for none) and max_tokens >= 1")


class Chat:
    """The conversation state and one reply at a time."""

    def __init__(self, cfg: ChatConfig, sched, tok, console):
        self.cfg, self.sched, self.tok, self.out = cfg, sched, tok, console
        self.thinking = {"auto": None, "on": True, "off": False}[cfg.thinking]
        self.budget = None if cfg.budget < 0 else cfg.budget
        self.history: list[dict] = []

    def note(self, text: str, style: str = "dim") -> None:
        self.out.print(text, style=style, markup=False, highlight=False)

    def command(self, line: str) -> bool:
        """Run a /command; False for /exit."""
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd in ("/exit", "/quit"):
            return False
        if cmd == "/think":
            self.thinking = True
            self.note("[thinking on]", style="dim")
        elif cmd == "/no_think":
            self.thinking = False
            self.note("[thinking off]", style="dim")
        elif cmd == "/budget":
            if arg in ("off", "none"):
                self.budget = None
                self.note("[no thinking budget]", style="dim")
            elif arg.isdigit():
                self.budget = int(arg)
                self.note(f"[thinking budget: {self.budget} tokens]", style="dim")
            else:
                self.note("usage: /budget N (tokens, >= 0) or /budget off", "bold red")
        elif cmd == "/reset":
            self.history = []
            self.note("[conversation cleared]", style="dim")
        elif cmd == "/help":
            self.out.print(HELP, style="dim")
        else:
            self.note(f"unknown command {cmd}; {HELP}", "bold red")
        return True

    def reply(self, text: str) -> None:
        from thinkrl.rollout import SamplingParams
        from thinkrl.rollout.thinking import thinking_open
        from thinkrl.serve.api import render_chat
        from thinkrl.serve.scheduler import Sequence
        from thinkrl.serve.split import ThinkSplitter

        cfg = self.cfg
        msgs = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + self.history
        msgs.append({"role": "user", "content": text})
        kwargs = {} if self.thinking is None else {"enable_thinking": self.thinking}
        prompt = render_chat(self.tok, msgs, kwargs)
        ids = self.tok(prompt, add_special_tokens=False).input_ids
        room = self.sched.dec.max_len - len(ids)
        if room < 1:
            self.note("[the conversation no longer fits the context; /reset]", style="bold red")
            return
        params = SamplingParams(
            max_new_tokens=min(cfg.max_tokens, room),
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            min_new_tokens=cfg.min_tokens,
            thinking_budget=self.budget,
        )
        events: queue.Queue = queue.Queue()
        seq = Sequence(
            ids=ids,
            params=params,
            seed=None if cfg.seed < 0 else cfg.seed,
            prompt_text=prompt,
            emit=events.put,
        )
        split, shown = ThinkSplitter(thinking_open(prompt)), None
        answer, n, t0 = "", 0, time.perf_counter()
        self.sched.submit([seq])
        try:
            while True:
                try:
                    ev = events.get(timeout=0.1)
                except queue.Empty:
                    continue
                n += len(ev.tokens)
                reasoning, content = split.feed(ev.text, final=ev.finish is not None)
                if reasoning:
                    if shown != "think":
                        self.out.print("thinking: ", style="dim", end="")
                        shown = "think"
                    self.out.print(reasoning, style="dim italic", end="", markup=False, highlight=False)
                if content:
                    if shown == "think":
                        self.out.print()
                    if shown != "answer":
                        self.out.print("assistant: ", style="bold", end="")
                        shown = "answer"
                    self.out.print(content, end="", markup=False, highlight=False)
                    answer += content
                if ev.finish:
                    break
        except KeyboardInterrupt:
            seq.cancel()
            self.note("\n[stopped]")
        else:
            dt = time.perf_counter() - t0
            self.note(f"\n[{n} tokens, {dt:.1f}s, {ev.finish}]")
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer.strip()}]


def run_chat(cfg: ChatConfig) -> int:
    from rich.console import Console

    from thinkrl.models import load_model
    from thinkrl.serve.scheduler import Scheduler
    from thinkrl.serve.server import ServeConfig, build_decoder

    # Ctrl-C stops a reply, so it must raise KeyboardInterrupt even where this process was
    # started with SIGINT ignored (a shell's background job inherits that, and Python then
    # leaves it ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    force = {"auto": None, "always": True, "never": False}[cfg.color]
    console = Console(force_terminal=force, no_color=cfg.color == "never", soft_wrap=True)
    model, tok = load_model(cfg.model)
    dec = build_decoder(
        model, tok, ServeConfig(model=cfg.model, max_slots=1, backend=cfg.backend, dtype=cfg.dtype)
    )
    sched = Scheduler(dec, tok, max_queue=0).start()
    chat = Chat(cfg, sched, tok, console)
    chat.note(f"thinkrl chat with {cfg.model}. {HELP}")
    try:
        while True:
            try:
                line = input("you> ")
            except EOFError:
                console.print()
                break
            except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
                console.print()
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not chat.command(line):
                    break
                continue
            chat.reply(line)
    finally:
        sched.stop()
    sys.stdout.flush()
    return 0
