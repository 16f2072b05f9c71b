"""Form rewards: the think/answer format (R1-Zero) and language consistency (R1)."""

from __future__ import annotations

import re
import unicodedata

from thinkrl.rewards.base import REWARDS, extract_thinking

# Inside each block, no tag of either kind may appear (no nesting, no stray closers).
_NO_TAG = r"(?:(?!</?(?:think|answer)>).)+"
_FORMAT = re.compile(rf"^\s*<think>{_NO_TAG}</think>\s*<answer>{_NO_TAG}</answer>\s*$", re.DOTALL)


# Qwen3's no-thinking form: an empty thinking block, then the answer.
_NO_THINK_FORMAT = re.compile(rf"^\s*<think>\s*</think>\s*<answer>{_NO_TAG}</answer>\s*$", re.DOTALL)


@REWARDS.register("format")
def format_reward(completion: str, example) -> float | None:
    """1.0 for exactly ``<think>...</think> <answer>...</answer>`` and nothing else around it.

    An example that asks for a thinking mode (``meta["thinking"]``, set by ``task.thinking``;
    thinkrl/tasks/thinking.py) must use that mode's form: ``off`` an empty thinking block
    (``<think> </think> <answer>...</answer>``), ``on`` a thinking block with something in it."""
    mode = getattr(example, "meta", {}).get("thinking")
    if mode == "off":
        return 1.0 if _NO_THINK_FORMAT.match(completion) else 0.0
    m = _FORMAT.match(completion)
    if m and mode == "on" and not extract_thinking(completion).strip():
        return 0.0
    return 1.0 if m else 0.0


# ---------------------------------------------------------------------------
# Language consistency (DeepSeek-R1, section 2.3.2: "the proportion of target language words in
# the CoT", added because R1-Zero's chains of thought mixed languages).

# Language codes -> the Unicode scripts their words are written in (first word of the code
# point's Unicode name: LATIN SMALL LETTER A, CJK UNIFIED IDEOGRAPH-4E2D, ...).
SCRIPTS = {
    "en": {"LATIN"},
    "fr": {"LATIN"},
    "de": {"LATIN"},
    "es": {"LATIN"},
    "latin": {"LATIN"},
    "zh": {"CJK"},
    "ja": {"CJK", "HIRAGANA", "KATAKANA"},
    "ko": {"HANGUL"},
    "ru": {"CYRILLIC"},
    "ar": {"ARABIC"},
    "el": {"GREEK"},
    "hi": {"DEVANAGARI"},
}
_WORD = re.compile(r"\w+")


def word_script(word: str) -> str | None:
    """The script of the word's first letter; None for digits/underscores only."""
    for ch in word:
        if ch.isalpha():
            return unicodedata.name(ch, "UNKNOWN").split()[0]
    return None


def split_words(text: str) -> list[str]:
    """Words; a run of CJK ideographs or kana counts one word per character (no spaces there)."""
    out = []
    for w in _WORD.findall(text):
        if word_script(w) in ("CJK", "HIRAGANA", "KATAKANA"):
            out.extend(ch for ch in w if ch.isalpha())
        else:
            out.append(w)
    return out


@REWARDS.register("language")
def language(completion: str, example, *, target: str = "en") -> float | None:
    """Share of the chain-of-thought's words written in the target language's script.

    The target is ``example.meta["language"]`` if set, else the ``target`` option. Scripts, not
    languages, are told apart (English and French both count as Latin). A chain of thought with no
    words cannot be judged (None).
    """
    lang = example.meta.get("language", target) if hasattr(example, "meta") else target
    if lang not in SCRIPTS:
        raise ValueError(f"language reward: unknown target '{lang}'; choose from: {', '.join(SCRIPTS)}")
    words = [w for w in split_words(extract_thinking(completion)) if word_script(w) is not None]
    if not words:
        return None
    wanted = SCRIPTS[lang]
    return sum(word_script(w) in wanted for w in words) / len(words)
