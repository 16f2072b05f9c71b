"""SFT and DPO checkpoint and resume exactly: a run stopped by Ctrl-C and resumed ends with the
weights of an uninterrupted run, and logs each step once."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from thinkrl.cli import main

QUESTIONS = ["1 + 1", "0 + 2", "2 + 0", "3 - 1", "4 - 2", "5 - 3", "6 - 4", "7 - 5"]
SHORT, LONG = "<think> 2 </think> <answer> 2 </answer>", "<think> so it is 2 </think> <answer> 2 </answer>"
COMMON = [
    "model=tiny-random",
    "progress=false",
    "task.template=plain",
    "dtype=fp32",
    "save_every=1",
    "keep_checkpoints=0",
    "max_steps=4",
]


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write(path, items):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in items))
    return Path(path)


def same_weights(a, b, name="model.safetensors") -> bool:
    wa, wb = load_file(Path(a) / name), load_file(Path(b) / name)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def interrupted_and_resumed(cmd: list[str], root: Path, monkeypatch) -> tuple[Path, Path]:
    """U: ``cmd`` straight. R: ``cmd`` with a SIGINT while step 2 is being saved, then resume=true."""
    u, r = root / "U", root / "R"
    assert main([*cmd, f"output_dir={u}"]) == 0
    monkeypatch.setenv("THINKRL_FAILPOINT", "save:2:INT")
    assert main([*cmd, f"output_dir={r}"]) == 130
    monkeypatch.delenv("THINKRL_FAILPOINT")
    assert sorted(p.name for p in (r / "checkpoints").iterdir()) == ["latest", "step-1", "step-2"]
    assert same_weights(r / "checkpoints" / "step-2", u / "checkpoints" / "step-2")
    assert main([*cmd, f"output_dir={r}", "resume=true"]) == 0
    return u, r


@pytest.mark.parametrize("lora", [False, True])
def test_sft_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch, lora):
    data = write(
        tmp_path / "sft.jsonl", [{"prompt": q, "completion": c} for q in QUESTIONS for c in (SHORT, LONG)]
    )
    extra = ["lora.enabled=true", "lora.r=4"] if lora else []
    cmd = ["sft", *COMMON, f"data={data}", "lr=0.01", "batch_size=4", *extra]
    u, r = interrupted_and_resumed(cmd, tmp_path, monkeypatch)
    assert same_weights(r / "final", u / "final")
    if lora:
        assert same_weights(r / "final", u / "final", "adapter/adapter_model.safetensors")
    mu, mr = read_jsonl(u / "metrics.jsonl"), read_jsonl(r / "metrics.jsonl")
    assert [m["step"] for m in mr] == [1, 2, 3, 4] and mr == mu
    assert mu[3]["ce"] < mu[0]["ce"]  # it trained
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(r / "final")).__name__ == "LlamaForCausalLM"


def test_dpo_resume_matches_an_uninterrupted_run_and_reuses_the_reference(tmp_path, monkeypatch):
    import thinkrl.trainer.dpo as dpo_mod

    data = write(
        tmp_path / "pairs.jsonl", [{"prompt": q, "chosen": SHORT, "rejected": LONG} for q in QUESTIONS]
    )
    cmd = ["dpo", *COMMON, f"data={data}", "lr=0.001", "batch_size=2"]
    real = dpo_mod.reference_logps
    calls = []
    monkeypatch.setattr(dpo_mod, "reference_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    u, r = interrupted_and_resumed(cmd, tmp_path, monkeypatch)
    assert len(calls) == 2  # U and R's first part: the resumed run took the reference from its checkpoint
    assert same_weights(r / "final", u / "final")
    mu, mr = read_jsonl(u / "metrics.jsonl"), read_jsonl(r / "metrics.jsonl")
    assert [m["step"] for m in mr] == [1, 2, 3, 4] and mr == mu
    assert mu[3]["reward_margin"] > mu[0]["reward_margin"]  # it trained


def test_sft_into_a_folder_with_checkpoints_needs_resume(tmp_path, capsys):
    data = write(tmp_path / "sft.jsonl", [{"prompt": q, "completion": SHORT} for q in QUESTIONS])
    cmd = ["sft", *COMMON, f"data={data}", "batch_size=4", f"output_dir={tmp_path / 'o'}"]
    assert main(cmd) == 0
    assert main(cmd) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("thinkrl:")]
    assert err == [
        f"thinkrl: error: {tmp_path / 'o'} already holds a run with checkpoints; pass resume=true to "
        "continue it, or choose another output_dir"
    ]


@pytest.mark.parametrize("lora", [False, True])
def test_rm_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch, lora):
    rows = [{"prompt": f"question {i}?", "chosen": "yes yes", "rejected": "no no"} for i in range(20)]
    data = write(tmp_path / "pairs.jsonl", rows)
    extra = ["lora.enabled=true", "lora.r=4"] if lora else []
    cmd = ["rm", *COMMON, f"data={data}", "lr=0.003", "batch_size=4", "eval_fraction=0.2", *extra]
    u, r = interrupted_and_resumed(cmd, tmp_path, monkeypatch)
    assert same_weights(r / "final", u / "final")
    if lora:  # the adapter saved with the head (peft's modules_to_save), resumed on top of the base
        assert same_weights(r / "final", u / "final", "adapter/adapter_model.safetensors")
        names = load_file(u / "final" / "adapter" / "adapter_model.safetensors").keys()
        assert any(n.endswith("score.weight") for n in names) and any("lora_A" in n for n in names)
    mu, mr = read_jsonl(u / "metrics.jsonl"), read_jsonl(r / "metrics.jsonl")
    assert [m["step"] for m in mr] == [1, 2, 3, 4] and mr == mu
    assert json.loads((r / "final" / "thinkrl_rm.json").read_text()) == json.loads(
        (u / "final" / "thinkrl_rm.json").read_text()
    )
