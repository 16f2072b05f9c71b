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
    assert prompt == (
        "<|im_start|>system\nThink first.<|im_end|>\n"
        f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n<think>"
    )
    assert prefill == "<think>"


def test_chat_template_without_system_prompt(tiny_pair):
    prompt, prefill = render_prompt(
        Q, tiny_pair[1], TaskConfig(template="chat", system_prompt=None, prefill="", fewshot=[])
    )
    assert prompt == f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n"
    assert prefill == ""


def test_default_chat_prompt_asks_for_the_tags(tiny_pair):
    prompt, _ = render_prompt(Q, tiny_pair[1], TaskConfig())
    assert "<think> </think>" in prompt and "<answer> </answer>" in prompt and Q in prompt


def test_plain_template(tiny_pair):
    assert render_prompt(Q, tiny_pair[1], TaskConfig(template="plain", prefill="<think>")) == (
        Q + "\n<think>",
        "<think>",
    )


def test_fewshot_turns_come_before_the_question(tiny_pair):
    cfg = TaskConfig(
        template="chat",
        system_prompt=None,
        prefill="<think>",
        fewshot=[{"question": "1+1?", "response": "<think> 2 </think> <answer> 2 </answer>"}],
    )
    prompt, _ = render_prompt(Q, tiny_pair[1], cfg)
    assert prompt == (
        "<|im_start|>user\n1+1?<|im_end|>\n"
        "<|im_start|>assistant\n<think> 2 </think> <answer> 2 </answer><|im_end|>\n"
        f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n<think>"
    )


def test_a_question_with_a_soft_switch_keeps_it_at_the_end_of_the_user_turn(tiny_pair):
    tok = tiny_pair[1]
    cfg = TaskConfig(template="chat", system_prompt=None, prefill="", fewshot=[])
    assert (
        render_prompt(Q + " /no_think", tok, cfg)[0]
        == f"<|im_start|>user\n{Q} /no_think<|im_end|>\n<|im_start|>assistant\n"
    )
    assert (
        render_prompt(Q + " /think", tok, cfg)[0]
        == f"<|im_start|>user\n{Q} /think<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_prompt(Q + " /think", tok, TaskConfig(template="plain", prefill=""))[0] == Q + " /think\n"


def test_thinking_must_be_on_off_or_switch():
    import pytest

    from thinkrl.config import ConfigError, build_config

    with pytest.raises(ConfigError, match="task.thinking 'maybe' unknown; choose from: on, off, switch"):
        build_config(overrides=["task.thinking=maybe"])
    with pytest.raises(ConfigError, match="task.think_share"):
        build_config(overrides=["task.thinking=switch", "task.think_share=1.5"])
    assert (
        build_config(overrides=["task.thinking=no_think"]).task.thinking == "no_think"
    )  # the older spelling
    from thinkrl.tasks.thinking import normalise

    # YAML reads task.thinking=off as false: still the off mode
    assert [
        normalise(build_config(overrides=[f"task.thinking={v}"]).task.thinking)
        for v in ("on", "off", "switch")
    ] == ["on", "off", "switch"]


def test_prompts_over_max_prompt_tokens_are_skipped_and_counted(tiny_pair, caplog):
    import logging

    from thinkrl.tasks import Example, Task
    from thinkrl.tasks.templates import drop_long_prompts

    class ListTask(Task):
        name = "list"

    tok = tiny_pair[1]
    rows = [Example(question="x" * n, answer="1") for n in (3, 10, 4, 30, 5)]
    task = ListTask(rows, rows[:2], seed=0)
    cfg = TaskConfig(template="plain", max_prompt_tokens=8, prefill="")
    # tiny-random's tokenizer is byte-level: "x" * n + "\n" is n + 1 tokens, so n <= 7 fits in 8
    assert [
        len(tok(render_prompt(r.question, tok, cfg)[0], add_special_tokens=False).input_ids) for r in rows
    ] == [4, 11, 5, 31, 6]
    with caplog.at_level(logging.WARNING):
        assert drop_long_prompts(task, tok, cfg) == 3  # train drops 10 and 30; eval drops 10
    assert [len(r.question) for r in task.train] == [3, 4, 5]
    assert [len(r.question) for r in task.eval] == [3]
    assert sum("skipped 2 of 5 train rows" in r.getMessage() for r in caplog.records) == 1
