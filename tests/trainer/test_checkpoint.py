import json
import random

import numpy as np
import torch

from thinkrl.trainer import checkpoint as ckpt
from thinkrl.trainer.logs import JsonlWriter, plot_metrics, read_jsonl


def test_save_list_prune_and_load(tiny_pair, tmp_path):
    model, tok = tiny_pair
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path / "checkpoints" / f"step-{step}", model, tok, {"step": step})
    (tmp_path / "checkpoints" / "step-9").mkdir()  # no state file: not a checkpoint
    (tmp_path / "checkpoints" / "notes").mkdir()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1, 2, 3]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-3"
    assert ckpt.load_state(tmp_path / "checkpoints" / "step-3") == {"step": 3}
    ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    # overwriting a checkpoint replaces it whole and leaves no .tmp/.old folder behind
    ckpt.save_checkpoint(tmp_path / "checkpoints" / "step-3", model, tok, {"step": 33})
    assert ckpt.load_state(tmp_path / "checkpoints" / "step-3") == {"step": 33}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["notes", "step-2", "step-3", "step-9"]
    assert ckpt.latest_checkpoint(tmp_path / "elsewhere") is None


def test_rng_state_round_trip():
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    state = ckpt.rng_state()
    first = (torch.rand(3), random.random(), np.random.rand())
    ckpt.set_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_jsonl_writer_truncates_on_resume_and_nulls_non_finite(tmp_path):
    path = tmp_path / "metrics.jsonl"
    w = JsonlWriter(path)
    for step in (1, 2, 3, 4):
        w.write({"step": step, "x": float("nan") if step == 2 else step / 2})
    assert [m["x"] for m in read_jsonl(path)] == [0.5, None, 1.5, 2.0]
    assert json.loads(path.read_text().splitlines()[1]) == {"step": 2, "x": None}  # valid JSON, no NaN
    JsonlWriter(path, truncate_after_step=2).write({"step": 3, "x": 9})
    assert [(m["step"], m["x"]) for m in read_jsonl(path)] == [(1, 0.5), (2, None), (3, 9)]
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_plot_metrics_writes_png(tmp_path):
    metrics = [{"step": i, "reward": i / 10, "accuracy": None, "kl": 0.01 * i} for i in range(1, 6)]
    out = plot_metrics(metrics, tmp_path / "curves.png", title="t", evals=[{"step": 0, "accuracy": 0.2}])
    assert out == tmp_path / "curves.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_metrics([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
