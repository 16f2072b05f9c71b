"""The one place that decides the dtype and the CPU fast paths (thinkrl/device.py)."""

import dataclasses

import pytest

from thinkrl import device
from thinkrl.config import ConfigError


@pytest.fixture
def fake_plan(monkeypatch):
    """Replace the probed plan with a chosen one: ``fake_plan(native_bf16=..., bf16_runs=...)``."""
    real = device.plan()

    def make(**kw):
        p = dataclasses.replace(real, **kw)
        monkeypatch.setattr(device, "plan", lambda: p)
        return p

    return make


def test_auto_picks_bf16_only_where_it_is_native(fake_plan):
    # AMX or AVX512-BF16: bf16; AVX-512 without BF16 (oneDNN emulates it, ~4x slower than
    # fp32 on Ice Lake): fp32; AVX2 only (no bf16 at all): fp32.
    for native, runs, want in ((True, True, True), (False, True, False), (False, False, False)):
        fake_plan(native_bf16=native, bf16_runs=runs, forced_off=())
        assert device.use_bf16("auto") is want
        assert device.use_bf16("fp32") is False


def test_bf16_where_it_cannot_run_is_one_clear_error(fake_plan):
    fake_plan(native_bf16=False, bf16_runs=False, cpu="Some CPU", capability="AVX2")
    with pytest.raises(ConfigError, match=r"dtype=bf16 but this CPU \(Some CPU, AVX2\) cannot run bf16"):
        device.use_bf16("bf16")


def test_bf16_asked_for_on_an_emulating_cpu_is_honoured_with_a_warning(fake_plan, caplog):
    fake_plan(native_bf16=False, bf16_runs=True)
    with caplog.at_level("WARNING"):
        assert device.use_bf16("bf16") is True
    assert "emulates" in caplog.text


def test_the_switches_force_every_path_off(fast_paths_off):
    p = fast_paths_off
    assert set(p.forced_off) == {"THINKRL_BF16", "THINKRL_PREPACK", "THINKRL_KERNELS"}
    assert not (p.auto_bf16 or p.onednn_prepack or p.mkl_prepack or p.kernel)
    assert device.use_bf16("auto") is False
    assert "forced off" in p.describe() and "dtype=auto is fp32" in p.describe()


def test_the_plan_matches_what_torch_reports():
    import torch

    p = device.plan()
    assert p.capability == torch.backends.cpu.get_cpu_capability()
    if p.native_bf16:
        assert p.bf16_runs  # native bf16 implies oneDNN's bf16 kernels
    if p.onednn_prepack:  # a probe that passed means the op really runs here
        w = torch.randn(16, 8).bfloat16()
        torch.ops.mkldnn._reorder_linear_weight(w, 4)
    assert p.cpu in p.describe() and p.capability in p.describe()


def test_the_device_key_resolves_to_the_cpu_and_refuses_cuda():
    import pytest

    from thinkrl.config import ConfigError

    assert device.resolve_device("auto") == "cpu" and device.resolve_device("cpu") == "cpu"
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match="does not train on CUDA yet"):
            device.resolve_device(name)
    with pytest.raises(ConfigError, match="device 'tpu' unknown"):
        device.resolve_device("tpu")
