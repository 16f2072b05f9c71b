"""Prompt templates: the R1-Zero template for base models, the chat template for chat models,
and Qwen3's /think and /no_think switches (see thinkrl/tasks/thinking.py)."""

from __future__ import annotations

from thinkrl.config import TaskConfig
from thinkrl.registry import Registry
from thinkrl.tasks.thinking import ON, SWITCH, empty_thinking, question_mode

# DeepSeek-AI 2025, "DeepSeek-R1", Table 1: the template R1-Zero was trained with.
R1_ZERO = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>. User: {question} Assistant: <think>"
)


TEMPLATES: Registry = Registry("prompt template")  # fn(question, tokenizer, task cfg) -> (prompt, prefill)


def render_prompt(question: str, tokenizer, cfg: TaskConfig) -> tuple[str, str]:
    """Return ``(prompt_text, prefill)``: the text fed to the model, and the part of it that
    belongs to the response (the reward sees ``prefill + completion``).

    A question that ends with Qwen3's soft switch, `` /think`` or `` /no_think`` (put there by
    ``task.thinking``, :mod:`thinkrl.tasks.thinking`), is rendered in that mode: the few-shot
    demonstrations carry the same switch, with their thinking emptied for ``/no_think``, and
    a chat template that has the ``enable_thinking`` flag gets it. Where that flag writes an
    empty thinking block into the prompt (Qwen3's), the block counts as prefill, so the
    reward sees the whole no-thinking response."""
    return TEMPLATES.get(cfg.template)(question, tokenizer, cfg)


@TEMPLATES.register("r1_zero")
def _r1_zero(question: str, tokenizer, cfg: TaskConfig) -> tuple[str, str]:
    return R1_ZERO.format(question=question), "<think>"


@TEMPLATES.register("plain")
def _plain(question: str, tokenizer, cfg: TaskConfig) -> tuple[str, str]:
    return question + "\n" + cfg.prefill, cfg.prefill


@TEMPLATES.register("chat")
def _chat(question: str, tokenizer, cfg: TaskConfig) -> tuple[str, str]:
    mode = question_mode(question)
    messages = chat_messages(question, cfg)
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prefill = cfg.prefill
    if mode is not None and has_thinking_flag(tokenizer):
        flagged = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=mode == ON
        )
        if flagged.startswith(text):  # what the flag appended (an empty block) is part of the response
            tail = flagged[len(text) :]
            if "</think>" in tail and prefill.lstrip().startswith("<think>"):
                prefill = ""  # the block is written already: no second opening tag
            prefill = tail + prefill
        else:
            text = flagged
    return text + prefill, prefill


def chat_messages(question: str, cfg: TaskConfig) -> list[dict]:
    """The chat turns before the answer: the system prompt, the few-shot demonstrations (in
    the question's thinking mode, if it asks for one) and the question."""
    mode = question_mode(question)
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    for shot in cfg.fewshot:
        q, r = shot["question"], shot["response"]
        if mode is not None:
            q, r = f"{q} {SWITCH[mode]}", (r if mode == ON else empty_thinking(r))
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": r}]
    return messages + [{"role": "user", "content": question}]


def has_thinking_flag(tokenizer) -> bool:
    """Whether the tokenizer's chat template reads ``enable_thinking`` (Qwen3's does)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):  # named templates
        template = " ".join(template.values())
    return "enable_thinking" in template


def drop_long_prompts(task, tokenizer, cfg: TaskConfig) -> int:
    """Skip (and count) training and held-out rows whose rendered prompt has more than
    ``cfg.max_prompt_tokens`` tokens; returns how many were skipped."""
    if not cfg.max_prompt_tokens:
        return 0

    def fits(ex) -> bool:
        text = render_prompt(ex.question, tokenizer, cfg)[0]
        return len(tokenizer(text, add_special_tokens=False).input_ids) <= cfg.max_prompt_tokens

    why = f"a prompt longer than task.max_prompt_tokens={cfg.max_prompt_tokens}"
    return task.keep(fits, why) + task.keep(fits, why, split="eval")
