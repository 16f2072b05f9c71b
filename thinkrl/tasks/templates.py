"""Prompt templates: the R1-Zero template for base models, the chat template for chat models."""

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
    belongs to the response (the reward sees ``prefill + completion``)."""
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
