"""What this machine computes fast, decided in one place: the dtype and the CPU fast paths.

CPUs differ more than their ``torch`` build suggests. Seen on this project's machines
(figures: docs/speed.md):

- Intel with AMX, and AMD Zen 4 with AVX512-BF16: bf16 matmuls run natively, 2-8x the
  fp32 rate;
- an Intel Xeon whose AMX the hypervisor hides (AVX512-BF16 only): bf16 runs natively but at
  half the fp32 rate;
- Intel Ice Lake (AVX-512 without BF16): oneDNN *emulates* bf16, at a quarter of the
  fp32 rate, so bf16 there is a slowdown, not a speed-up;
- AMD with AVX2 only: no bf16 kernels at all, and oneDNN's bf16 weight prepack raises.

So ``dtype=auto`` means bf16 only where the CPU has bf16 instructions (AVX512-BF16 or
AMX on x86, the BF16 extension on Arm) *and* a bf16 matmul, timed once against an fp32 one,
runs at least ``BF16_PAYS`` times faster; fp32 everywhere else. Each fast path is probed
once, by running it, rather than assumed:

- ``onednn_prepack``: oneDNN's prepacked bf16 linear (the engine's bf16 weights);
- ``onednn_fp32_prepack``: oneDNN's prepacked fp32 linear (the engine's fp32 weights, first
  choice: on the AVX2-only AMD EPYC of issue 18 it ran a 64-row decode step's linears
  1.1-1.2x and an 8-row step's 1.9-2.2x faster than MKL's packed sgemm, which packs for one
  row count only; benchmarks/decode_matmul.py, docs/speed.md);
- ``mkl_prepack``: MKL's packed sgemm weights (the fp32 fallback where oneDNN's does not run);
- ``kernel``: the engine's C decode-attention kernel (built and checked in
  ``rollout/kernels.py``; this flag only says whether it may be tried).

All of this is the CPU performance policy, applied on the CPU only (:func:`setup`); the
CUDA path uses bf16 autocast where the GPU has it, SDPA attention and pinned copies.

Each can be forced off for testing or debugging, which is how the test suite runs
every fallback on every CPU: ``THINKRL_BF16=0`` (auto picks fp32),
``THINKRL_PREPACK=0`` (no prepacked weights of any kind), ``THINKRL_ONEDNN_FP32=0`` (fp32
weights packed by MKL, not oneDNN), ``THINKRL_KERNELS=0`` (no C kernel). :func:`plan`
reads them once; :func:`reset` forgets the cached plan.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from thinkrl.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CpuPlan:
    cpu: str  # the processor's model name
    capability: str  # torch.backends.cpu.get_cpu_capability(): AVX512, AVX2, DEFAULT, SVE256, ...
    native_bf16: bool  # bf16 dot-product instructions (AVX512-BF16, AMX-BF16, Arm BF16)
    bf16_runs: bool  # oneDNN runs bf16 at all (natively or emulated)
    onednn_prepack: bool  # oneDNN's prepacked bf16 linear runs and agrees with F.linear
    onednn_fp32_prepack: bool  # oneDNN's prepacked fp32 linear runs and agrees with F.linear
    mkl_prepack: bool  # MKL's packed fp32 linear runs and agrees with F.linear
    kernel: bool  # the C decode-attention kernel may be built and tried
    forced_off: tuple[str, ...] = ()  # switches set to 0 in the environment
    # bf16 matmul rate / fp32 matmul rate, measured at a training shape where bf16 is native
    # (None: not measured, bf16 is not native here)
    bf16_speedup: float | None = None

    @property
    def bf16_pays(self) -> bool:
        """Native bf16 that also runs clearly faster than fp32 here. Not every CPU with the
        instructions does: on an Intel Xeon whose AMX the hypervisor hides (AVX512-BF16 only,
        2026-12-07), oneDNN's bf16 matmul ran at half the fp32 rate."""
        return self.native_bf16 and (self.bf16_speedup is None or self.bf16_speedup >= BF16_PAYS)

    @property
    def auto_bf16(self) -> bool:
        """What ``dtype=auto`` picks: bf16 only where it is native and measured faster than
        fp32 (and not switched off)."""
        return self.bf16_pays and "THINKRL_BF16" not in self.forced_off

    def describe(self) -> str:
        fp = [
            name
            for name, on in (
                ("oneDNN bf16 prepack", self.onednn_prepack),
                ("oneDNN fp32 prepack", self.onednn_fp32_prepack),
                ("MKL fp32 prepack", self.mkl_prepack and not self.onednn_fp32_prepack),
                ("C kernel", self.kernel),
            )
            if on
        ]
        off = f"; forced off: {', '.join(self.forced_off)}" if self.forced_off else ""
        bf16 = "native" if self.native_bf16 else "emulated" if self.bf16_runs else "none"
        if self.native_bf16 and self.bf16_speedup is not None:
            bf16 += f", {self.bf16_speedup:.2g}x fp32's matmul rate"
        return (
            f"{self.cpu} ({self.capability}, bf16 {bf16}): "
            f"dtype=auto is {'bf16' if self.auto_bf16 else 'fp32'}; fast paths: {', '.join(fp) or 'none'}{off}"
        )


SWITCHES = ("THINKRL_BF16", "THINKRL_PREPACK", "THINKRL_ONEDNN_FP32", "THINKRL_KERNELS")

# dtype=auto takes bf16 only where its matmuls run at least this many times the fp32 rate:
# bf16 costs precision (the engine's log-probs then differ from the training forward's by up
# to ~0.3, against 1e-4 in fp32), so it must buy a clear speed-up. Measured at 2048^3 on the
# project's CPUs (docs/speed.md): AMX 1815 vs ~200 GFLOP/s; Zen 4 AVX512-BF16 390 vs 185;
# an Intel Xeon with AVX512-BF16 but its AMX hidden, 158 vs 331.
BF16_PAYS = 1.25


def _off(name: str) -> bool:
    return os.environ.get(name, "1") == "0"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _native_bf16() -> bool:
    """bf16 arithmetic in hardware, not oneDNN's emulation through fp32."""
    cpu = torch.cpu
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    if platform.machine().lower() in ("aarch64", "arm64"):
        try:  # Linux names the Armv8.6 BF16 extension "bf16" among the Features
            return any(
                line.startswith("Features") and " bf16" in f" {line.split(':', 1)[1]}"
                for line in Path("/proc/cpuinfo").read_text().splitlines()
            )
        except OSError:
            return False  # macOS: Apple's M2 and later have it, but oneDNN's bf16 path there is untested
    return False


def _bf16_speedup(rows: int = 256, inner: int = 576, out: int = 1536, reps: int = 5) -> float:
    """bf16's matmul rate over fp32's at a training shape (smollm2-135m's MLP up-projection
    on ``rows`` tokens), on this process's threads: the best of ``reps`` interleaved timings
    each, after a warm-up (about 30 ms in all on a 2-core CPU)."""
    import time

    g = torch.Generator().manual_seed(0)
    a32, b32 = torch.randn(rows, inner, generator=g), torch.randn(inner, out, generator=g)
    pairs = {torch.float32: (a32, b32), torch.bfloat16: (a32.bfloat16(), b32.bfloat16())}
    for a, b in pairs.values():  # warm-up: oneDNN builds its kernels on the first call
        torch.mm(a, b)
    best = dict.fromkeys(pairs, float("inf"))
    for _ in range(reps):
        for dt, (a, b) in pairs.items():  # interleaved, so a busy moment slows both alike
            t = time.perf_counter()
            torch.mm(a, b)
            best[dt] = min(best[dt], time.perf_counter() - t)
    return best[torch.float32] / best[torch.bfloat16]


def _bf16_runs() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # noqa: BLE001 (an op missing from this torch build)
        return False


def agrees(got: Tensor, want: Tensor, tol: float) -> bool:
    """``got`` equals ``want`` within ``tol``, relative and relative to the largest ``|want|``."""
    got, want = got.float(), want.float()
    return bool(torch.allclose(got, want, rtol=tol, atol=tol * want.abs().max().item()))


def _probe_value(name: str, fn):
    """``fn()``, or None where it fails (a private op missing from this build), logged."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        log.info("%s unavailable on this CPU (%s)", name, str(e).splitlines()[0][:200])
        return None


def _probe(name: str, fn) -> bool:
    """Run a private op once on small inputs; any failure means: do without it."""
    return bool(_probe_value(name, fn))


class Packer:
    """Prepacked linear weights: ``pack(w)`` once per sync, then ``linear(x, w, packed, b)``
    computes ``x @ w.T + b`` from the packed copy. The packed layouts skip the reorder that
    F.linear does inside every call: at the decode shapes (64 rows x 576 -> 1536, 49152, ...)
    1.2-2.6x faster in bf16 and 1.2-1.9x in fp32 (benchmarks/decode_matmul.py). bf16 weights
    are always oneDNN's; fp32 ones oneDNN's (``onednn=True``) or MKL's packed sgemm. The ops
    are private to torch, so the engine checks them against F.linear at every sync."""

    def __init__(self, dtype: torch.dtype, batch_size: int, onednn: bool = True):
        self.dtype, self.batch_size = dtype, batch_size
        self.onednn = onednn or dtype == torch.bfloat16
        fmt = "bf16" if dtype == torch.bfloat16 else "fp32"
        self.name = f"oneDNN {fmt}" if self.onednn else f"MKL {fmt}"

    def pack(self, w: Tensor) -> Tensor:
        if self.onednn:
            return torch.ops.mkldnn._reorder_linear_weight(w, self.batch_size)
        return torch.ops.mkl._mkl_reorder_linear_weight(w, self.batch_size)

    def linear(self, x: Tensor, w: Tensor, packed: Tensor, b: Tensor | None = None) -> Tensor:
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        return torch.ops.mkl._mkl_linear(x, packed, w, b, self.batch_size)


def _packs(dtype: torch.dtype, onednn: bool) -> bool:
    """A small linear through :class:`Packer` equals F.linear (bf16: 1e-2, fp32: 1e-5),
    without and with a bias, on fewer rows than the packing was made for."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(48, 32, generator=g).to(dtype), torch.randn(5, 32, generator=g).to(dtype)
    b = torch.randn(48, generator=g).to(dtype)
    p = Packer(dtype, 8, onednn)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    packed = p.pack(w)
    return agrees(p.linear(x, w, packed), F.linear(x, w), tol) and agrees(
        p.linear(x, w, packed, b), F.linear(x, w, b), tol
    )


@functools.cache
def plan() -> CpuPlan:
    """The machine's plan, probed once per process."""
    forced = tuple(n for n in SWITCHES if _off(n))
    bf16_runs = _bf16_runs()
    prepack_ok = "THINKRL_PREPACK" not in forced
    # instructions oneDNN may not use (ONEDNN_MAX_CPU_ISA below them) are not native bf16 for us
    native = _native_bf16() and bf16_runs
    speedup = _probe_value("bf16 matmul timing", _bf16_speedup) if native else None
    return CpuPlan(
        cpu=_cpu_name(),
        capability=torch.backends.cpu.get_cpu_capability(),
        native_bf16=native,
        bf16_speedup=speedup,
        bf16_runs=bf16_runs,
        onednn_prepack=prepack_ok
        and bf16_runs
        and torch.backends.mkldnn.is_available()
        and _probe("oneDNN bf16 prepack", lambda: _packs(torch.bfloat16, True)),
        onednn_fp32_prepack=prepack_ok
        and "THINKRL_ONEDNN_FP32" not in forced
        and torch.backends.mkldnn.is_available()
        and _probe("oneDNN fp32 prepack", lambda: _packs(torch.float32, True)),
        mkl_prepack=prepack_ok
        and torch.backends.mkl.is_available()
        and _probe("MKL fp32 prepack", lambda: _packs(torch.float32, False)),
        kernel="THINKRL_KERNELS" not in forced,
        forced_off=forced,
    )


def reset() -> None:
    """Forget the cached plan (after changing a THINKRL_* switch)."""
    plan.cache_clear()


def use_bf16(dtype: str, dev: str = "cpu") -> bool:
    """Whether to compute in bf16 for ``dtype`` = auto | bf16 | fp32 on ``dev``.

    On CUDA, ``auto`` and ``bf16`` mean bf16 autocast wherever the GPU runs bf16 (Ampere and
    later). On the CPU, ``bf16`` is honoured wherever oneDNN runs bf16 at all, emulated
    included (it is then slower than fp32, which the log says); ``auto`` picks bf16 only
    where it is native."""
    if dtype == "fp32":
        return False
    if is_cuda(dev):
        ok = torch.cuda.is_bf16_supported()
        if dtype == "bf16" and not ok:
            raise ConfigError(
                f"dtype=bf16 but this GPU ({torch.cuda.get_device_name(dev)}) cannot run bf16; "
                "use dtype=fp32 or dtype=auto"
            )
        return ok
    p = plan()
    if dtype == "bf16":
        if not p.bf16_runs:
            raise ConfigError(
                f"dtype=bf16 but this CPU ({p.cpu}, {p.capability}) cannot run bf16; "
                "use dtype=fp32 or dtype=auto"
            )
        if not p.native_bf16:
            log.warning(
                "dtype=bf16 on a CPU without bf16 instructions: oneDNN emulates it, "
                "typically slower than fp32 (dtype=auto would pick fp32)"
            )
        elif not p.bf16_pays:
            log.warning(
                "dtype=bf16 on a CPU whose bf16 matmuls measured %.2gx the fp32 rate "
                "(dtype=auto would pick fp32)",
                p.bf16_speedup,
            )
        return True
    return p.auto_bf16


def packer(dtype: torch.dtype, batch_size: int, wanted: bool | None) -> Packer | None:
    """The packer for ``dtype`` where the device plan says it runs (``wanted``: None asks the plan)."""
    p = plan()
    if dtype == torch.bfloat16:
        ok, onednn = p.onednn_prepack, True
    else:  # oneDNN's fp32 packing where it runs, MKL's otherwise
        ok, onednn = p.onednn_fp32_prepack or p.mkl_prepack, p.onednn_fp32_prepack
    return Packer(dtype, batch_size, onednn) if (ok if wanted is None else wanted and ok) else None


def resolve_device(name: str) -> str:
    """The device a run computes on, for the config's ``device`` = auto | cpu | cuda | cuda:N:
    ``"cpu"`` or ``"cuda:N"``. ``auto`` is the first CUDA GPU where one is present, else the
    CPU; asking for a GPU that is not there is a config error that lists what is."""
    if name not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", name):
        raise ConfigError(f"device '{name}' unknown; choose from: auto, cpu, cuda, cuda:N")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if name == "cpu" or name == "auto" and not gpus:
        return "cpu"
    # under torchrun, auto and cuda mean the GPU of this process's local rank
    index = int(name.split(":")[1]) if ":" in name else int(os.environ.get("LOCAL_RANK", "0"))
    if index >= gpus:
        have = f"cuda:0 .. cuda:{gpus - 1}" if gpus else "no CUDA GPU"
        raise ConfigError(
            f"device={name} but this machine has {have}; choose from: auto, cpu"
            + (", cuda, " + ", ".join(f"cuda:{i}" for i in range(gpus)) if gpus else "")
        )
    return f"cuda:{index}"


def is_cuda(dev) -> bool:
    return str(dev).startswith("cuda")


def setup(dev: str) -> None:
    """Process-wide settings for computing on ``dev``: the CPU performance policy applies on
    the CPU only (the allocator tuning here; oneDNN/MKL prepack and the C kernel live in the
    fast engine, which runs on the CPU only; eager attention for training:
    :func:`train_attention`). On CUDA: the GPU is made current."""
    if is_cuda(dev):
        torch.cuda.set_device(torch.device(dev))
        return
    from thinkrl.perf import tune_allocator

    tune_allocator()


def train_attention(dev: str) -> str:
    """The attention implementation for training forward passes: plain matmuls on the CPU,
    whose backward beats the fused SDPA kernel's at these lengths (~15% of a GRPO step on
    smollm2-135m, docs/speed.md); SDPA (flash / memory-efficient kernels) on CUDA."""
    return "sdpa" if is_cuda(dev) else "eager"


def autocast(enabled: bool, dev: str = "cpu"):
    """bf16 autocast on ``dev``'s device type, or nothing."""
    if enabled:
        return torch.autocast("cuda" if is_cuda(dev) else "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to(x: Tensor, dev) -> Tensor:
    """``x`` on ``dev``: a no-op where it is already there; host-to-GPU copies go from pinned
    memory, without blocking the host (the copy then overlaps the Python that follows)."""
    if x.device == torch.device(dev):
        return x
    if is_cuda(dev) and x.device.type == "cpu":
        return x.pin_memory().to(dev, non_blocking=True)
    return x.to(dev)


def seeded(seed: int | None, dev: str = "cpu"):
    """A context in which the random state of the CPU (and of ``dev``'s GPU) starts from
    ``seed`` and is restored afterwards; nothing for ``seed`` None."""
    if seed is None:
        return contextlib.nullcontext()
    return _seeded(seed, dev)


@contextlib.contextmanager
def _seeded(seed: int, dev: str):
    with torch.random.fork_rng(devices=[torch.device(dev)] if is_cuda(dev) else []):
        torch.manual_seed(seed)
        yield


def describe(dev: str) -> str:
    """One line on what ``dev`` is, for the run's log."""
    if is_cuda(dev):
        return f"GPU: {torch.cuda.get_device_name(torch.device(dev))} ({dev})"
    return f"CPU: {plan().describe()}"
