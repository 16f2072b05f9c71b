"""The one place that decides the dtype and the CPU fast paths (thinkrl/device.py)."""

import dataclasses

import pytest
import torch

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


def test_auto_picks_bf16_only_where_it_is_native_and_measured_faster(fake_plan):
    # AMX (~9x fp32's rate) or Zen 4's AVX512-BF16 (~2.1x): bf16; AVX512-BF16 on a Xeon whose
    # AMX is hidden (~0.5x) or just under the bar: fp32; AVX-512 without BF16 (oneDNN emulates
    # it, ~4x slower than fp32 on Ice Lake): fp32; AVX2 only (no bf16 at all): fp32.
    cases = [
        (True, True, 9.0, True),
        (True, True, 2.1, True),
        (True, True, device.BF16_PAYS, True),
        (True, True, 0.5, False),
        (True, True, device.BF16_PAYS - 0.01, False),
        (False, True, None, False),
        (False, False, None, False),
    ]
    for native, runs, speedup, want in cases:
        p = fake_plan(native_bf16=native, bf16_runs=runs, bf16_speedup=speedup, forced_off=())
        assert device.use_bf16("auto") is want, (native, runs, speedup)
        assert device.use_bf16("fp32") is False
        assert ("dtype=auto is bf16" in p.describe()) is want


def test_bf16_asked_for_where_it_measured_slower_is_honoured_with_a_warning(fake_plan, caplog):
    p = fake_plan(native_bf16=True, bf16_runs=True, bf16_speedup=0.48, forced_off=())
    with caplog.at_level("WARNING"):
        assert device.use_bf16("bf16") is True
    assert "0.48x the fp32 rate" in caplog.text
    assert "bf16 native, 0.48x fp32's matmul rate" in p.describe()


def test_the_bf16_timing_is_a_ratio_of_two_real_matmul_rates(monkeypatch):
    """The probe times torch.mm in both dtypes on the same shapes: with the clock stubbed so
    every bf16 call takes 1 unit and every fp32 call 3, the ratio is exactly 3."""
    import time

    calls, clock = [], [0.0]
    real_mm = torch.mm

    def mm(a, b):
        calls.append(a.dtype)
        clock[0] += 1.0 if a.dtype == torch.bfloat16 else 3.0
        return real_mm(a, b)

    def perf_counter():
        return clock[0]

    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(time, "perf_counter", perf_counter)
    assert device._bf16_speedup(rows=8, inner=16, out=32, reps=4) == pytest.approx(3.0)
    assert calls.count(torch.float32) == calls.count(torch.bfloat16) == 5  # 1 warm-up + 4 timed each


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
    assert set(p.forced_off) == {"THINKRL_BF16", "THINKRL_PREPACK", "THINKRL_ONEDNN_FP32", "THINKRL_KERNELS"}
    assert not (p.auto_bf16 or p.onednn_prepack or p.onednn_fp32_prepack or p.mkl_prepack or p.kernel)
    assert device.packer(torch.float32, 8, None) is None and device.packer(torch.bfloat16, 8, None) is None
    assert device.use_bf16("auto") is False
    assert "forced off" in p.describe() and "dtype=auto is fp32" in p.describe()


def test_the_plan_matches_what_torch_reports():
    p = device.plan()
    assert p.capability == torch.backends.cpu.get_cpu_capability()
    if p.native_bf16:
        assert p.bf16_runs  # native bf16 implies oneDNN's bf16 kernels
        assert p.bf16_speedup is not None and p.bf16_speedup > 0  # and its rate was timed
    else:
        assert p.bf16_speedup is None
    if p.onednn_prepack:  # a probe that passed means the op really runs here
        w = torch.randn(16, 8).bfloat16()
        torch.ops.mkldnn._reorder_linear_weight(w, 4)
    if p.onednn_fp32_prepack:
        torch.ops.mkldnn._reorder_linear_weight(torch.randn(16, 8), 4)
    assert p.cpu in p.describe() and p.capability in p.describe()


def test_the_device_key_resolves_and_a_missing_gpu_is_one_clear_error(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.resolve_device("auto") == "cpu" and device.resolve_device("cpu") == "cpu"
    for name in ("cuda", "cuda:1"):
        with pytest.raises(
            ConfigError, match=f"device={name} but this machine has no CUDA GPU; choose from: auto, cpu$"
        ):
            device.resolve_device(name)
    with pytest.raises(ConfigError, match="device 'tpu' unknown; choose from: auto, cpu, cuda, cuda:N"):
        device.resolve_device("tpu")


def test_with_two_gpus_auto_is_the_first_and_a_third_is_refused(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device.resolve_device("auto") == "cuda:0" and device.resolve_device("cuda") == "cuda:0"
    assert device.resolve_device("cuda:1") == "cuda:1" and device.resolve_device("cpu") == "cpu"
    with pytest.raises(
        ConfigError,
        match=r"device=cuda:2 but this machine has cuda:0 .. cuda:1; "
        r"choose from: auto, cpu, cuda, cuda:0, cuda:1",
    ):
        device.resolve_device("cuda:2")


def test_the_cpu_policy_is_the_cpu_s_alone():
    """Eager attention for training, the allocator tuning and the fast engine's CPU paths on
    the CPU; SDPA on CUDA; bf16 autocast on the device's own type."""
    import torch

    assert device.train_attention("cpu") == "eager" and device.train_attention("cuda:0") == "sdpa"
    with device.autocast(True, "cpu"):
        assert torch.is_autocast_enabled("cpu")
    with device.autocast(False, "cuda:0"):
        assert not torch.is_autocast_enabled("cpu")
    x = torch.ones(2)
    assert device.to(x, "cpu") is x  # no copy where it already is


def test_seeded_draws_repeat_and_restore_the_global_stream():
    import torch

    state = torch.get_rng_state()
    with device.seeded(7):
        a = torch.rand(3)
    with device.seeded(7):
        b = torch.rand(3)
    assert torch.equal(a, b) and torch.equal(state, torch.get_rng_state())
    torch.manual_seed(7)
    assert torch.equal(torch.rand(3), a)  # seed 7 is torch's own seed 7


def test_fp32_weights_are_packed_by_onednn_and_by_mkl_when_switched(cpu_switches):
    """oneDNN packs the fp32 weights where its probe passed; THINKRL_ONEDNN_FP32=0 gives MKL's
    packing instead, and both compute F.linear (with and without a bias, on fewer rows than
    the packing was made for)."""
    p = device.plan()
    if not (p.onednn_fp32_prepack or p.mkl_prepack):
        pytest.skip(f"no fp32 prepack on this CPU ({p.cpu}, {p.capability}) or switched off")
    g = torch.Generator().manual_seed(0)
    w, x, b = torch.randn(96, 40, generator=g), torch.randn(3, 40, generator=g), torch.randn(96, generator=g)
    kinds = {}
    for flag in ("1", "0"):
        cpu_switches(THINKRL_ONEDNN_FP32=flag)
        pk = device.packer(torch.float32, 16, None)
        if pk is None:
            continue
        kinds[flag] = pk.name
        packed = pk.pack(w)
        torch.testing.assert_close(pk.linear(x, w, packed), x @ w.T, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pk.linear(x, w, packed, b), x @ w.T + b, atol=1e-5, rtol=1e-5)
    if p.onednn_fp32_prepack:
        assert kinds["1"] == "oneDNN fp32"
    if p.mkl_prepack:
        assert kinds["0"] == "MKL fp32"
    assert device.packer(torch.float32, 16, False) is None  # the engine's prepack=False
