from thinkrl.config import TaskConfig
from thinkrl.tasks.templates import R1_ZERO, render_prompt

Q = "What is 17 + 25?"


def test_r1_zero_template(tiny_pair):
    prompt, prefill = render_prompt(Q, tiny_pair[1], TaskConfig(template="r1_zero"))
    assert prompt == R1_ZERO.format(question=Q)
    assert f"User: {Q} Assistant: <think>" in prompt
    assert prompt.endswith("<think>") and prefill == "<think>"


def test_chat_template_with_system_prompt(tiny_pair):
    cfg = TaskConfig(template="chat", system_prompt="Think first.", prefill="<think>", fewshot=[])
    prompt, prefill = render_prompt(Q, tiny_pair[1], cfg)
    # tiny-random's ChatML template, written out by hand
    assert prompt == ("<|im_start|>system\nThink first.<|im_end|>\n"
                      f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n<think>")
    assert prefill == "<think>"


def test_chat_template_without_system_prompt(tiny_pair):
    prompt, prefill = render_prompt(Q, tiny_pair[1], TaskConfig(template="chat", system_prompt=None, prefill="",
                                                                fewshot=[]))
    assert prompt == f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n"
    assert prefill == ""


def test_default_chat_prompt_asks_for_the_tags(tiny_pair):
    prompt, _ = render_prompt(Q, tiny_pair[1], TaskConfig())
    assert "<think> </think>" in prompt and "<answer> </answer>" in prompt and Q in prompt


def test_plain_template(tiny_pair):
    assert render_prompt(Q, tiny_pair[1], TaskConfig(template="plain", prefill="<think>")) == (
        Q + "\n<think>", "<think>")


def test_fewshot_turns_come_before_the_question(tiny_pair):
    cfg = TaskConfig(template="chat", system_prompt=None, prefill="<think>",
                     fewshot=[{"question": "1+1?", "response": "<think> 2 </think> <answer> 2 </answer>"}])
    prompt, _ = render_prompt(Q, tiny_pair[1], cfg)
    assert prompt == ("<|im_start|>user\n1+1?<|im_end|>\n"
                      "<|im_start|>assistant\n<think> 2 </think> <answer> 2 </answer><|im_end|>\n"
                      f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n<think>")
