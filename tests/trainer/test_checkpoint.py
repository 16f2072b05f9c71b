import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
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
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest",
        "notes",
        "step-2",
        "step-3",
        "step-9",
    ]
    assert ckpt.latest_checkpoint(tmp_path / "elsewhere") is None


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    random.gauss(0, 1), np.random.randn()  # both now hold a cached Gaussian, which is part of their state
    torch.save({"rng": ckpt.rng_state()}, tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)["rng"]  # tensors and plain containers only

    def draw():
        return torch.rand(3), random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn()

    first = draw()
    ckpt.set_rng_state(state)
    again = draw()
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


# ---------------------------------------------------------------------------
# Crash safety: verification, fallback, the latest pointer, replacement, NaN weights


def save_steps(model, tok, run, steps):
    for step in steps:
        ckpt.save_checkpoint(
            run / "checkpoints" / f"step-{step}", model, tok, {"step": step, "w": torch.ones(2)}
        )


def test_a_checkpoint_is_whole_and_named_by_latest(tiny_pair, tmp_path):
    model, tok = tiny_pair
    save_steps(model, tok, tmp_path, [1, 2])
    step2 = tmp_path / "checkpoints" / "step-2"
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-2\n"
    manifest = json.loads((step2 / "manifest.json").read_text())["files"]
    assert {"config.json", "model.safetensors", "trainer_state.pt"} <= manifest.keys()
    assert manifest["model.safetensors"]["size"] == (step2 / "model.safetensors").stat().st_size
    assert ckpt.verify(step2) is None
    path, state = ckpt.find_resumable(tmp_path)
    assert path == step2 and state["step"] == 2 and torch.equal(state["w"], torch.ones(2))
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


@pytest.mark.parametrize(
    "damage,why",
    [
        (
            lambda d: (d / "model.safetensors").write_bytes(b"\0" * (d / "model.safetensors").stat().st_size),
            "model.safetensors does not match its checksum",
        ),
        (lambda d: (d / "trainer_state.pt").write_bytes(b"torn"), "trainer_state.pt has 4 bytes"),
        (lambda d: (d / "config.json").unlink(), None),  # no longer a checkpoint at all: skipped silently
        (lambda d: (d / "manifest.json").unlink(), "no readable manifest.json"),
    ],
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tiny_pair, tmp_path, caplog, damage, why):
    model, tok = tiny_pair
    save_steps(model, tok, tmp_path, [1, 2])
    damage(tmp_path / "checkpoints" / "step-2")
    with caplog.at_level(logging.WARNING, logger="thinkrl.trainer.checkpoint"):
        path, state = ckpt.find_resumable(tmp_path)
    assert path.name == "step-1" and state["step"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if why is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and "step-2 is damaged" in warnings[0] and why in warnings[0], warnings


def test_no_whole_checkpoint_is_one_clear_error(tiny_pair, tmp_path):
    model, tok = tiny_pair
    save_steps(model, tok, tmp_path, [1])
    (tmp_path / "checkpoints" / "step-1" / "trainer_state.pt").write_bytes(b"x")
    assert ckpt.find_resumable(tmp_path) is None
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint in .* is whole"):
        ckpt.resume_point(tmp_path, resume=True)


def test_state_that_needs_arbitrary_pickles_does_not_load(tiny_pair, tmp_path, caplog):
    """weights_only=True: a state holding an object other than tensors and plain containers is refused."""
    model, tok = tiny_pair
    save_steps(model, tok, tmp_path, [1])
    ckpt.save_checkpoint(tmp_path / "checkpoints" / "step-2", model, tok, {"step": 2, "np": np.zeros(2)})
    assert ckpt.verify(tmp_path / "checkpoints" / "step-2") is None  # whole, but not loadable safely
    path, _ = ckpt.find_resumable(tmp_path)
    assert path.name == "step-1" and "trainer_state.pt does not load" in caplog.text


def test_a_crash_while_replacing_a_checkpoint_keeps_the_old_one(tiny_pair, tmp_path, monkeypatch):
    """Replacing final/: it is renamed to final.old, the new one renamed in, final.old deleted. A crash
    between the two renames leaves final.old only, which recover() puts back."""
    model, tok = tiny_pair
    final = tmp_path / "final"
    ckpt.save_checkpoint(final, model, tok, {"step": 1})
    real_rename = Path.rename

    def crash_on_second_rename(self, target):
        if self.name == "final.tmp":
            raise KeyboardInterrupt("crash")  # the old one is already final.old
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(final, model, tok, {"step": 2})
    monkeypatch.undo()
    assert not final.exists() and (tmp_path / "final.old").is_dir() and (tmp_path / "final.tmp").is_dir()
    ckpt.recover(tmp_path, only="final")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert ckpt.load_state(final) == {"step": 1} and ckpt.verify(final) is None


def test_recover_removes_half_written_and_half_deleted_folders(tmp_path):
    ck = tmp_path / "checkpoints"
    for name in ("step-3.tmp", "step-1.del", "step-2"):
        (ck / name).mkdir(parents=True)
    (ck / "latest.tmp").write_text("step-3\n")
    ckpt.recover(ck)
    assert sorted(p.name for p in ck.iterdir()) == ["step-2"]


def test_weights_with_a_nan_are_never_saved(tiny, tmp_path):
    model, tok = tiny
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ckpt.CheckpointError, match="model.layers.0.mlp.up_proj.weight has non-finite values"):
        ckpt.save_checkpoint(tmp_path / "checkpoints" / "step-1", model, tok, {"step": 1})
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_truncation_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "x": 1}\n{"step": 2, "x": 2}\n{"step": 3, "x"')  # kill -9 mid-append
    assert [m["step"] for m in read_jsonl(path)] == [1, 2]
    JsonlWriter(path, truncate_after_step=5).write({"step": 3, "x": 3})
    assert [(m["step"], m["x"]) for m in read_jsonl(path)] == [(1, 1), (2, 2), (3, 3)]


class _Counter:
    """A component with a state: how many times it was bumped."""

    def __init__(self):
        self.n = 0

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, s):
        self.n = s["n"]


def test_checkpointer_assembles_and_restores_the_trainer_state(tiny_pair, tmp_path):
    model, tok = tiny_pair
    a, b = _Counter(), _Counter()
    a.n, b.n = 3, 5
    saver = ckpt.Checkpointer(
        tmp_path, model, tok, {"a": a, "b": b, "none": None}, required=("a",), extra={"k": 1}
    )
    torch.manual_seed(7)
    path = saver.save_step(4)
    expected_draw = torch.rand(3)  # what the RNG gives after the save
    assert path == tmp_path / "checkpoints" / "step-4"
    state = ckpt.load_state(path)
    assert state["step"] == 4 and state["a"] == {"n": 3} and state["b"] == {"n": 5}
    assert state["none"] is None and state["k"] == 1 and "torch" in state["rng"]

    a2, b2 = _Counter(), _Counter()
    fresh = ckpt.Checkpointer(tmp_path, model, tok, {"a": a2, "b": b2, "none": None}, required=("a",))
    torch.manual_seed(0)
    assert fresh.restore(path, state) == 4
    assert (a2.n, b2.n) == (3, 5)
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG is back where it was saved

    older = {k: v for k, v in state.items() if k != "b"}  # a checkpoint from before "b" existed
    b3 = _Counter()
    ckpt.Checkpointer(tmp_path, model, tok, {"a": _Counter(), "b": b3}, required=("a",)).load_state_dict(
        older
    )
    assert b3.n == 0  # optional: left as built
    with pytest.raises(ckpt.CheckpointError, match="no 'a'"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != "a"})


def test_checkpointer_keeps_the_newest_and_writes_final(tiny_pair, tmp_path):
    model, tok = tiny_pair
    saver = ckpt.Checkpointer(tmp_path, model, tok, {}, keep=2)
    for step in (1, 2, 3):
        saver.save_step(step)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2, 3]
    assert saver.save(3, "final") == tmp_path / "final"
    assert ckpt.load_state(tmp_path / "final")["step"] == 3
