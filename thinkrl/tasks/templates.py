"""Prompt templates: the R1-Zero template for base models, the chat template for chat models,
and Qwen3's /think and /no_think switches."""

from __future__ import annotations

from thinkrl.config import TaskConfig

# DeepSeek-AI 2025, "DeepSeek-R1", Table 1: the template R1-Zero was trained with.
R1_ZERO = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>. User: {question} Assistant: <think>"
)


def render_prompt(question: str, tokenizer, cfg: TaskConfig) -> tuple[str, str]:
    """Return ``(prompt_text, prefill)``: the text fed to the model, and the part of it that
    belongs to the response (the reward sees ``prefill + completion``).

    ``cfg.thinking`` appends Qwen3's soft switch, " /think" or " /no_think", to the user's
    question (Qwen3 technical report, "thinking mode fusion")."""
    if cfg.thinking:
        question = f"{question} /{cfg.thinking}"
    if cfg.template == "r1_zero":
        return R1_ZERO.format(question=question), "<think>"
    if cfg.template == "plain":
        return question + "\n" + cfg.prefill, cfg.prefill
    messages = []
    if cfg.system_prompt:
        messages.append({"role": "system", "content": cfg.system_prompt})
    for shot in cfg.fewshot:
        messages += [{"role": "user", "content": shot["question"]},
                     {"role": "assistant", "content": shot["response"]}]
    messages.append({"role": "user", "content": question})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + cfg.prefill, cfg.prefill


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
