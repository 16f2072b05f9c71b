"""`thinkrl chat` driven as a person would: lines on stdin, and Ctrl-C in a terminal (pexpect)."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lively_dir(tmp_path_factory, shake):
    """tiny-random with its weights shaken (so greedy text varies), saved as an HF folder."""
    from thinkrl.models import load_model, save_model

    model, tok = load_model("tiny-random")
    model = copy.deepcopy(model)
    shake(model)
    d = tmp_path_factory.mktemp("lively")
    save_model(model, tok, d)
    return d


def env():
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "COLUMNS": "400",
    }


def greedy(model_dir, prompt: str, n: int) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(
        ids,
        max_new_tokens=n,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        temperature=None,
        top_p=None,
        top_k=None,
    )[0, ids.shape[1] :]
    return tok, tok.decode(out, skip_special_tokens=True)


def test_piped_conversation_commands_and_thinking(lively_dir):
    """Two turns, /budget and /think, /reset and a bad command, over piped stdin. The first
    answer is HF generate's greedy text; the second turn's prompt carries the first turn; the
    budgeted thinking ends with the closing phrase, printed apart from the answer."""
    lines = ["Hello", "What now?", "/budget 4", "/think", "Why?", "/budget x", "/bogus", "/reset", "/exit"]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "thinkrl",
            "chat",
            f"model={lively_dir}",
            "max_tokens=120",
            "temperature=0",
            "dtype=fp32",
            "color=never",
        ],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        env=env(),
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    out = clean(r.stdout)  # rich drops some control characters that random text holds; compare the rest
    tok, first = greedy(lively_dir, _prompt(lively_dir, [{"role": "user", "content": "Hello"}]), 120)
    assert clean(first.strip()) and f"assistant: {clean(first.strip())}" in out
    hist = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": first.strip()},
        {"role": "user", "content": "What now?"},
    ]
    _, second = greedy(lively_dir, _prompt(lively_dir, hist), 120)
    assert f"assistant: {clean(second.strip())}" in out  # multi-turn: the second prompt holds the first turn
    assert "[thinking budget: 4 tokens]" in out and "[thinking on]" in out
    think = out[out.index("[thinking on]") :]
    assert "thinking: " in think and "Considering the limited time" in think  # budget 4 forced the close
    assert "usage: /budget N" in out and "unknown command /bogus" in out and "[conversation cleared]" in out


def clean(text: str) -> str:
    return "".join(c for c in text if c.isprintable())


def _prompt(model_dir, msgs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_ctrl_c_stops_the_reply_not_the_program(lively_dir):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(
        sys.executable,
        [
            "-m",
            "thinkrl",
            "chat",
            f"model={lively_dir}",
            "max_tokens=2000",
            "min_tokens=2000",
            "dtype=fp32",
            "color=never",
        ],
        env=env(),
        encoding="utf-8",
        timeout=120,
    )
    try:
        child.expect("you> ")
        # Interrupt each reply at its first streamed text (thinking or answer). A reply can end
        # before the interrupt lands on a fast machine (2000 tokens take ~2.5 s here): then ask
        # again, a few times; the program must stop one and stay alive.
        stopped = False
        for _ in range(4):
            child.sendline("Tell me everything")
            child.expect(["thinking: ", "assistant: "])
            child.sendintr()
            stopped = child.expect([r"\[stopped\]", r"\[\d+ tokens, "], timeout=60) == 0
            child.expect("you> ")
            if stopped:
                break
        assert stopped, "Ctrl-C never stopped a reply"
        child.sendline("/exit")
        child.expect(pexpect.EOF, timeout=30)
    finally:
        child.close()
    assert child.exitstatus == 0
