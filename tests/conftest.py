"""Shared fixtures. Everything runs on CPU with the built-in ``tiny-random`` model, offline."""

import copy
import os
import uuid

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never try the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture
def cpu_switches(monkeypatch):
    """``cpu_switches(THINKRL_ONEDNN_FP32="0", ...)`` sets thinkrl/device.py switches and returns
    the plan made under them; the switches and the plan are restored afterwards."""
    from thinkrl import device

    def set_switches(**env):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        device.reset()
        return device.plan()

    yield set_switches
    monkeypatch.undo()
    device.reset()


@pytest.fixture
def fast_paths_off(cpu_switches):
    """Every CPU fast path switched off, as on a CPU that has none: fp32 for dtype=auto, no
    prepacked weights, no C kernel (the switches of thinkrl/device.py)."""
    from thinkrl import device

    return cpu_switches(**dict.fromkeys(device.SWITCHES, "0"))


@pytest.fixture(scope="session")
def tiny_pair():
    """The cached tiny-random model and tokenizer, loaded once; do not mutate (use ``tiny``)."""
    from thinkrl.models import load_model

    model, tok = load_model("tiny-random")
    model.eval()
    return model, tok


def shaken(model):
    """``model`` (in place) with every weight moved by seeded noise of scale 0.5, so that greedy
    text is not one repeated token (and biases and norms leave their initial 0 and 1)."""
    import torch

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


@pytest.fixture(scope="session")
def shake():
    """:func:`shaken`, for test modules (a conftest's functions are reached through fixtures)."""
    return shaken


@pytest.fixture
def tiny(tiny_pair):
    """A private copy of tiny-random that a test may train."""
    model, tok = tiny_pair
    return copy.deepcopy(model), tok


@pytest.fixture(scope="session")
def byte_sum_reward():
    """A deterministic reward that varies between random completions, so GRPO groups have non-zero
    advantages and training actually moves the weights. Registered once under a unique name (the
    registry has no way to unregister)."""
    from thinkrl.rewards import REWARDS

    name = f"test_byte_sum_{uuid.uuid4().hex[:8]}"

    @REWARDS.register(name)
    def _reward(completion, example):
        return (sum(map(ord, completion)) % 7) / 6

    return name
