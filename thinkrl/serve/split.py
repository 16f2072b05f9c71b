"""Split a reply into its thinking and its answer, incrementally, as DeepSeek's API does:
the text inside ``<think>`` ... ``</think>`` is ``reasoning_content``, the rest ``content``.

A reply thinks when its prompt ends inside an open ``<think>`` (a thinking template's
generation prompt, or the server's prefill for ``enable_thinking``), or when the reply itself
starts with ``<think>``. Text that might be the start of a tag is held back until the next
piece shows what it is, so streamed deltas never carry half a tag.
"""

from __future__ import annotations

from thinkrl.rollout.thinking import CLOSE, OPEN

BEFORE, THINKING, ANSWER = range(3)


def _partial_tail(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ThinkSplitter:
    def __init__(self, opened: bool):
        self.state = THINKING if opened else BEFORE
        self.buf = ""
        self.fresh = True  # at the start of the current part: leading whitespace is dropped

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """Add ``text``; returns the new ``(reasoning, content)`` that is safe to send.
        ``final``: no more text comes, flush everything."""
        self.buf += text
        reasoning, content = "", ""
        while True:
            if self.state == BEFORE:
                head = self.buf.lstrip()
                if head.startswith(OPEN):
                    self.buf, self.state, self.fresh = head[len(OPEN) :], THINKING, True
                    continue
                if not final and OPEN.startswith(head):  # could still become <think>
                    return reasoning, content
                self.state = ANSWER
                continue
            if self.state == THINKING:
                i = self.buf.find(CLOSE)
                if i >= 0:
                    reasoning += self._take(self.buf[:i])
                    self.buf, self.state, self.fresh = self.buf[i + len(CLOSE) :], ANSWER, True
                    continue
                keep = 0 if final else _partial_tail(self.buf, CLOSE)
                reasoning += self._take(self.buf[: len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep :]
                return reasoning, content
            content += self._take(self.buf)
            self.buf = ""
            return reasoning, content

    def _take(self, text: str) -> str:
        if self.fresh:
            text = text.lstrip()
            self.fresh = not text
        return text


def split(text: str, opened: bool) -> tuple[str, str]:
    """The whole reply's ``(reasoning_content, content)``."""
    return ThinkSplitter(opened).feed(text, final=True)
