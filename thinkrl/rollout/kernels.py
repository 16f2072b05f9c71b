"""Build and load the engine's C kernel (``decode_attention.c``) on first use.

The source ships with the package; it is compiled once per machine and source version
with the system C compiler (``-O3 -march=native``: it runs where it was built) into
``$THINKRL_CACHE`` (default ``~/.cache/thinkrl``), and called through ``ctypes``, which
releases the GIL for the call. The code is portable C with GCC vector extensions, so the
same source builds for AVX-512, AVX2, SSE or Arm NEON; ``THINKRL_KERNEL_MARCH`` (default
``native``) builds for another target, which is how the tests check an AVX2-only build
on a bigger CPU. Nothing here is required: without a compiler, with
``THINKRL_KERNELS=0``, or if the build fails, :func:`decode_attention_kernel` returns
``None`` (logged once) and the engine uses its torch-ops path, which computes the same
attention (the engine also checks the kernel against that path before using it).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("decode_attention.c")
# -ffast-math only when compiling (it lets gcc vectorise expf and reassociate the sums);
# linking without it keeps crtfastmath.o, which would flush denormals process-wide, out of the library.
CFLAGS = ["-O3", "-ffast-math", "-fopenmp", "-fPIC", "-std=c11", "-Wall"]
LDFLAGS = ["-shared", "-fopenmp", "-lm"]
_libs: dict[str, ctypes.CDLL | None] = {}  # per -march target; None: could not be had


def _march() -> str:
    return os.environ.get("THINKRL_KERNEL_MARCH", "native")


def _cpu_tag() -> str:
    """What -march=native depends on: the CPU's model and flags (a cached build is per machine)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(lines)))


def _build(march: str) -> Path:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler found (gcc/cc)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    cflags = [f"-march={march}", *CFLAGS]
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), " ".join(cflags + LDFLAGS), version, _cpu_tag()]).encode()
    ).hexdigest()[:16]
    cache = Path(os.environ.get("THINKRL_CACHE", Path.home() / ".cache" / "thinkrl")) / "kernels"
    out = cache / f"decode_attention-{key}.so"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        obj, lib = Path(tmp) / "k.o", Path(tmp) / "k.so"
        for cmd in (
            [cc, *cflags, "-c", str(SOURCE), "-o", str(obj)],
            [cc, str(obj), "-o", str(lib), *LDFLAGS],
        ):
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if res.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr.strip()[-2000:]}")
        os.replace(lib, out)  # atomic: concurrent builders never see a half-written library
    return out


def decode_attention_kernel():
    """The loaded C function (bf16 or fp32 caches), or None where it cannot be had."""
    march = _march()
    if march not in _libs:
        _libs[march] = None
        if os.environ.get("THINKRL_KERNELS", "1") == "0":
            log.info("THINKRL_KERNELS=0: decode attention runs on torch ops")
        else:
            try:
                lib = ctypes.CDLL(str(_build(march)))
                fn = lib.decode_attention
                fn.argtypes = [ctypes.c_void_p] * 10 + [ctypes.c_int64] * 13
                fn.restype = ctypes.c_int
                _libs[march] = lib
            except Exception as e:  # noqa: BLE001 (any failure means: use the torch path)
                log.warning("C decode-attention kernel unavailable (%s); using torch ops", e)
    lib = _libs[march]
    return lib.decode_attention if lib is not None else None


def decode_attention(
    fn,
    q: Tensor,
    knew: Tensor,
    vnew: Tensor,
    kp_t: Tensor,
    vp: Tensor,
    kg_t: Tensor,
    vg: Tensor,
    group: Tensor,
    pstart: Tensor,
    t: int,
    out: Tensor,
) -> Tensor:
    """Run the kernel (see ``decode_attention.c`` for the layouts); writes slot ``t`` of the
    generated caches and returns ``out`` [b, nh * hd]. The tensors other than ``group`` and
    ``pstart`` are all bf16 or all fp32."""
    nkv, g, hd, P = kp_t.shape
    b, T = kg_t.shape[1], kg_t.shape[3]
    rep = q.shape[1] // (nkv * hd)
    dt = kp_t.dtype
    if dt not in (torch.bfloat16, torch.float32):
        raise TypeError(f"decode_attention: bf16 or fp32 caches, not {dt}")
    for x in (kp_t, vp, kg_t, vg, out, group, pstart):
        assert x.is_contiguous()
    for x in (q, knew, vnew, kp_t, vp, kg_t, vg, out):
        assert x.stride(-1) == 1 and x.dtype == dt
    assert group.dtype == pstart.dtype == torch.int64
    rc = fn(
        q.data_ptr(),
        knew.data_ptr(),
        vnew.data_ptr(),
        kp_t.data_ptr(),
        vp.data_ptr(),
        kg_t.data_ptr(),
        vg.data_ptr(),
        group.data_ptr(),
        pstart.data_ptr(),
        out.data_ptr(),
        b,
        g,
        nkv,
        rep,
        hd,
        P,
        T,
        t,
        q.stride(0),
        knew.stride(0),
        vnew.stride(0),
        torch.get_num_threads(),
        int(dt == torch.float32),
    )
    if rc != 0:
        raise MemoryError("decode_attention: a worker could not allocate its buffers")
    return out
