"""The batching loop of ``thinkrl serve``: one thread owns the slot decoder; requests join the
running batch between two decode steps and leave it when they finish or their client goes.

HTTP handlers (asyncio) talk to it through :class:`Sequence` objects: ``submit`` queues them,
the loop admits them into free slots, and every step pushes each sequence's new text to its
handler's asyncio queue (thread-safe, via the event loop). A full queue raises
:class:`QueueFull` (HTTP 429); ``Sequence.cancel`` (a client that disconnected) frees the slot
at the next step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from thinkrl.rollout import SamplingParams
from thinkrl.rollout.slots import Emitted

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More requests than slots plus queue places."""


@dataclass
class Event:
    """New output of one sequence: text (stop strings cut off), the tokens behind it with
    their log-probs, and, on the last event, why it finished."""

    index: int
    text: str
    tokens: list[Emitted]
    finish: str | None = None  # "stop" | "length" on the last event


@dataclass
class Sequence:
    """One choice of one request."""

    ids: list[int]
    params: SamplingParams
    index: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    prompt_text: str | None = None
    top_logprobs: int = 0
    emit: object = None  # callable(Event), called on the loop thread
    cancelled: bool = False
    slot: int | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # the reply decoded so far (whole characters only)
    sent: int = 0  # characters of ``text`` already sent
    prefix: int = 0  # incremental decoding: tokens[prefix:read] were decoded last time (see _decode)
    read: int = 0
    submitted: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        self.cancelled = True


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` to hold back: an incomplete UTF-8 character,
    or the start of a stop string that the next tokens may complete."""
    hold = 0
    while hold < len(text) and text[len(text) - 1 - hold] == "\ufffd":
        hold += 1
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


class Scheduler:
    """Owns ``decoder`` (a :class:`thinkrl.rollout.slots.SlotDecoder`) on one thread."""

    def __init__(self, decoder, tok, max_queue: int = 256):
        self.dec, self.tok, self.max_queue = decoder, tok, max_queue
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self.cv = threading.Condition()
        self.stopped = False
        self.steps = 0
        self.thread = threading.Thread(target=self._loop, name="thinkrl-serve-batch", daemon=True)

    def start(self) -> Scheduler:
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cv:
            self.stopped = True
            self.cv.notify()
        self.thread.join(timeout=10)

    @property
    def active(self) -> int:
        return len(self.running)

    def submit(self, seqs: list[Sequence]) -> None:
        """Queue the choices of one request together, or refuse them all (QueueFull)."""
        with self.cv:
            free = self.dec.max_slots - len(self.running)
            if len(self.waiting) + len(seqs) > free + self.max_queue:
                raise QueueFull(
                    f"the server is at capacity ({self.dec.max_slots} slots and "
                    f"{self.max_queue} queued requests); retry later"
                )
            self.waiting.extend(seqs)
            self.cv.notify()

    # -- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self.stopped and not self.waiting and not self.running:
                    self.cv.wait()
                if self.stopped:
                    return
                admit = []
                while self.waiting and len(self.running) + len(admit) < self.dec.max_slots:
                    admit.append(self.waiting.popleft())
            try:
                self._tick(admit)
            except Exception:  # noqa: BLE001 (one bad step must not kill the server: fail its requests)
                log.exception("decode step failed; ending the running requests")
                for seq in list(self.running.values()) + admit:
                    self._finish(seq, "error")

    def _tick(self, admit: list[Sequence]) -> None:
        for seq in list(self.running.values()):
            if seq.cancelled:
                self._release(seq)
        for seq in admit:
            if seq.cancelled:
                continue
            seq.slot = self.dec.add(
                seq.ids, seq.params, seed=seq.seed, prompt_text=seq.prompt_text, top_logprobs=seq.top_logprobs
            )
            self.running[seq.slot] = seq
        if not self.running:
            return
        emitted = self.dec.step()
        self.steps += 1
        for e in emitted:
            seq = self.running.get(e.slot)
            if seq is not None:
                self._advance(seq, e)

    def _advance(self, seq: Sequence, e: Emitted) -> None:
        """Append the token, send the text that is safe to send, finish on EOS, length or a
        stop string."""
        seq.tokens.append(e.token)
        finish = e.reason if e.finished else None
        text = self._decode(seq, flush=finish is not None)
        cut = min(
            (i for i in (text.find(s, max(0, seq.sent - len(s))) for s in seq.stop) if i >= 0), default=-1
        )
        if cut >= 0:
            text, finish = text[:cut], "stop"
        end = len(text) if finish else len(text) - _held_back(text, seq.stop)
        if end > seq.sent or finish:
            self._send(seq, Event(seq.index, text[seq.sent : end], [e], finish))
            seq.sent = max(seq.sent, end)
        else:
            self._send(seq, Event(seq.index, "", [e]))
        if finish:
            self._release(seq)

    def _decode(self, seq: Sequence, flush: bool) -> str:
        """``seq.text`` with its new tokens decoded, in time independent of the reply's length:
        only the tokens since the last decoded boundary are decoded, with a few before them
        for context (a tokenizer may render a token differently at the start of a text), and
        text is taken only once it ends in a whole character (vLLM's detokenizer does the
        same), unless ``flush``."""
        dec = lambda toks: self.tok.decode(toks, skip_special_tokens=True)  # noqa: E731
        before = dec(seq.tokens[seq.prefix : seq.read])
        now = dec(seq.tokens[seq.prefix :])
        if len(now) > len(before) and (flush or not now.endswith("\ufffd")):
            seq.text += now[len(before) :]
            seq.prefix, seq.read = seq.read, len(seq.tokens)
        return seq.text

    def _release(self, seq: Sequence) -> None:
        self.running.pop(seq.slot, None)
        self.dec.free(seq.slot)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.slot is not None:
            self.running.pop(seq.slot, None)
            self.dec.free(seq.slot)
        self._send(seq, Event(seq.index, "", [], reason))

    @staticmethod
    def _send(seq: Sequence, ev: Event) -> None:
        if seq.emit is not None and not seq.cancelled:
            seq.emit(ev)
