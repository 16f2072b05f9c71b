"""Checkpoints: an HF-format model folder plus ``trainer_state.pt`` for exact resumption.

A checkpoint survives a crash (``kill -9``, a power cut) at any moment:

- it is written to ``step-N.tmp/``, every file and the folder are fsynced, and only
  then is the folder renamed to ``step-N/`` (a rename within one folder is atomic), so
  a ``step-N/`` folder is always whole;
- it carries ``manifest.json``, the size and SHA-256 of every other file in it, so a
  loader can tell a whole checkpoint from one that a disk or a person damaged later;
- ``checkpoints/latest`` names the newest checkpoint; it is replaced atomically after
  the folder is in place (tmp file, fsync, ``os.replace``), so it never names a folder
  that is not there yet;
- a folder that already exists (``final/`` of a resumed run, a step redone after a
  fallback) is first renamed to ``NAME.old`` and removed after the new one is in place:
  at every moment one of the two names holds a whole checkpoint, and
  :func:`recover` puts ``NAME.old`` back if a crash struck in between.

:class:`Checkpointer` is the one place where a trainer's state (optimizer, schedule, RNGs, ...)
is assembled for a checkpoint and put back on resume.

:func:`find_resumable` verifies each candidate (manifest, then the state loading with
``weights_only=True``) and falls back to the previous one with a warning.

Our own state is tensors and plain containers only (:func:`rng_state` turns numpy's and
Python's RNG states into those), so it loads with ``torch.load(weights_only=True)``,
which cannot run code hidden in a pickle.

With LoRA the folder still holds a plain model (the adapter merged into a copy), so
``from_pretrained`` and ``thinkrl eval`` load it as any other; the adapter itself goes
to ``adapter/`` (peft's format), which is what a resumed run loads on top of the
untouched base weights: resuming from the merged weights would shift the base, and
with it the KL reference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from thinkrl.config import ConfigError
from thinkrl.distributed import torch_dist as dist
from thinkrl.models import save_model
from thinkrl.trainer.common import is_lora, merged_copy
from thinkrl.trainer.interrupt import Interrupted, failpoint

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
LATEST = "latest"  # checkpoints/latest: the name of the newest checkpoint folder, one line
ADAPTER_DIR = "adapter"  # LoRA runs: peft's adapter_config.json + adapter_model.safetensors
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be written or read as it should: one clear message, no traceback."""


# ---------------------------------------------------------------------------
# RNG state as tensors and plain containers (loadable with weights_only=True)


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
    }


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    py = s["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npy = s["numpy"]
    np.random.set_state(
        (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"])
    )


class _Optimizer:
    """An optimizer as a checkpoint component: its state with whole tensors, whatever the
    world size and strategy (a sharded policy's moments are gathered on save and re-sharded
    on load: thinkrl/distributed/torch_dist.py)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        return dist.optimizer_state(self.optimizer)

    def load_state_dict(self, sd: dict) -> None:
        dist.load_optimizer_state(self.optimizer, sd)


class _Rng:
    """The process's random generators, as a component of the trainer state."""

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, s: dict) -> None:
        set_rng_state(s)


# ---------------------------------------------------------------------------
# Durable writes


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's data to disk (a folder's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new content."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_manifest(folder: Path) -> None:
    """Record every file's size and hash, then fsync every file and folder under ``folder``."""
    files = {
        p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in _files(folder)
    }
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))
    for p in _files(folder):
        fsync_path(p)
    for d in sorted({p.parent for p in _files(folder)}, key=lambda d: -len(d.parts)):
        fsync_path(d)


# ---------------------------------------------------------------------------
# Saving


def check_finite(model) -> None:
    """Refuse to save weights with a NaN or an infinity in them: such a checkpoint would
    only ever be resumed into the same failure."""
    for name, w in model.named_parameters():
        if not torch.isfinite(w).all():
            raise CheckpointError(
                f"refusing to save a checkpoint: parameter {name} has non-finite values "
                "(the run diverged; lower optim.lr, check the rewards, and resume from the last "
                "checkpoint)"
            )


def save_checkpoint(path: Path, model, tokenizer, state: dict) -> Path:
    """Write a verified, fsynced checkpoint folder at ``path``; see the module docstring."""
    path = Path(path)
    check_finite(model)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(merged_copy(model), tokenizer, tmp)
    if is_lora(model):
        model.save_pretrained(tmp / ADAPTER_DIR)
    torch.save(state, tmp / STATE_FILE)
    _write_manifest(tmp)
    failpoint("save", state.get("step", -1))  # tests: a crash with the folder written, not yet in place
    _move_into_place(tmp, path)
    failpoint("commit", state.get("step", -1))  # tests: a crash before checkpoints/latest names it
    if _STEP_DIR.match(path.name):
        write_atomic(path.parent / LATEST, (path.name + "\n").encode())
    return path


def _move_into_place(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``. An existing ``path`` goes to ``path.old`` first and is
    deleted last, so one of the two names holds a whole checkpoint at every moment."""
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    fsync_path(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover(folder: Path, only: str | None = None) -> None:
    """Tidy a checkpoint folder after a crash: put back a ``NAME.old`` whose replacement
    never arrived, and delete half-written ``.tmp`` and half-deleted ``.del`` folders.
    ``only``: touch nothing but ``only.*`` (a run folder holds other files, ``final.*`` is ours)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in sorted(folder.iterdir()):
        if only is not None and p.name.rsplit(".", 1)[0] != only:
            continue
        if p.name.endswith(".old"):
            target = p.with_name(p.name.removesuffix(".old"))
            if target.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                log.warning("restoring %s: a crash struck while it was being replaced", target)
                p.rename(target)
        elif p.name.endswith((".tmp", ".del")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.endswith(".tmp"):  # checkpoints/latest.tmp
            p.unlink()
    fsync_path(folder)


# ---------------------------------------------------------------------------
# Finding and loading


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    ck = Path(run_dir) / "checkpoints"
    if not ck.is_dir():
        return []
    found = []
    for p in ck.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).is_file() and (p / "config.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest step checkpoint folder, unverified (see :func:`find_resumable`)."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` step checkpoints (``final/`` is never pruned). Each doomed
    folder is renamed away first, so a crash mid-delete leaves no half folder under a
    checkpoint's name."""
    if keep <= 0:
        return
    for _, p in list_checkpoints(run_dir)[:-keep]:
        doomed = p.with_name(p.name + ".del")
        p.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def verify(path: Path) -> str | None:
    """Why the checkpoint at ``path`` is not whole, or None when its manifest checks out."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return f"no readable {MANIFEST}"
    for name in (STATE_FILE, "config.json"):
        if name not in manifest:
            return f"{name} is missing"
    for name, meta in manifest.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta["size"]:
            return f"{name} has {f.stat().st_size} bytes, not {meta['size']}"
        if _sha256(f) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


def load_state(path: Path) -> dict:
    """The trainer state of a checkpoint; tensors and plain containers only (weights_only)."""
    return torch.load(Path(path) / STATE_FILE, weights_only=True, map_location="cpu")  # any device resumes it


def find_resumable(run_dir: Path) -> tuple[Path, dict] | None:
    """The newest step checkpoint that verifies and whose state loads, with that state.

    A damaged one is skipped with a warning and the previous one tried, so a checkpoint
    corrupted after it was written costs the steps since the one before it, not the run."""
    run_dir = Path(run_dir)
    recover(run_dir / "checkpoints")
    for _, path in reversed(list_checkpoints(run_dir)):
        problem = verify(path)
        if problem is None:
            try:
                return path, load_state(path)
            except Exception as e:  # a pickle that does not load: same as a damaged file
                problem = f"{STATE_FILE} does not load ({type(e).__name__}: {e})"
        log.warning("checkpoint %s is damaged (%s): falling back to the one before it", path, problem)
    return None


def resume_point(run_dir: Path, resume: bool) -> tuple[Path, dict] | None:
    """The verified checkpoint (and its state) a run in ``run_dir`` continues from, if any.

    Shared by ``train``, ``sft`` and ``dpo``: a folder with checkpoints needs ``resume=true``
    (a fresh run there would mix two runs' logs), and a finished run with no step
    checkpoint cannot be resumed."""
    run_dir = Path(run_dir)
    recover(run_dir / "checkpoints")
    recover(run_dir, only="final")
    if list_checkpoints(run_dir) and not resume:
        raise ConfigError(
            f"{run_dir} already holds a run with checkpoints; pass resume=true to continue it, "
            "or choose another output_dir"
        )
    if not resume:
        return None
    found = find_resumable(run_dir)
    if found is None and list_checkpoints(run_dir):
        raise CheckpointError(
            f"no checkpoint in {run_dir / 'checkpoints'} is whole (see the warnings above); "
            "move that folder away to start the run over"
        )
    if found is None and (run_dir / "final").is_dir():
        raise ConfigError(f"{run_dir} has a finished run (final/) and no step checkpoint to resume from")
    return found


def has_adapter(path: Path) -> bool:
    return (Path(path) / ADAPTER_DIR / "adapter_model.safetensors").is_file()


def load_adapter(model, path: Path) -> None:
    """Load the LoRA weights saved in ``path/adapter/`` into the peft-wrapped ``model``
    (same targets and rank), bit for bit."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    where = Path(path) / ADAPTER_DIR
    try:
        result = set_peft_model_state_dict(model, load_file(where / "adapter_model.safetensors"))
    except RuntimeError as e:  # a shape mismatch: another rank
        raise ConfigError(
            f"the LoRA adapter in {where} does not fit lora.*: {str(e).splitlines()[0]}"
        ) from None
    if result.unexpected_keys:
        raise ConfigError(
            f"the LoRA adapter in {where} does not fit lora.target_modules: it has "
            f"{result.unexpected_keys[:2]}; resume with the run's own lora.* settings"
        )


# ---------------------------------------------------------------------------
# The trainer state of a run


class Checkpointer:
    """A run's checkpoints: the weights and tokenizer (an HF folder), the trainer state beside
    them, assembled here once (:meth:`state_dict`) and restored here once (:meth:`load_state_dict`).

    ``components`` maps each state key to an object with ``state_dict()`` and
    ``load_state_dict()``, or to None (saved as None: a part this run does not have); the
    process's RNGs are added as ``rng``. A resumed state must hold the ``required`` keys; the
    others are loaded when the state has them (checkpoints older than a component lack it).
    ``extra`` is written as it is into every state. ``sidecars`` are models saved beside the HF
    folder (the PPO critic): objects with ``save_beside(run_dir, name)``, ``load_beside(run_dir,
    path)`` and ``prune_beside(run_dir, keep)``. Only rank 0 writes; every rank waits for it."""

    def __init__(
        self,
        run_dir: Path,
        model,
        tok,
        components: dict,
        *,
        required: tuple[str, ...] = (),
        extra: dict | None = None,
        sidecars: tuple = (),
        keep: int = 0,
    ):
        self.run_dir, self.model, self.tok = Path(run_dir), model, tok
        self.components = {
            k: _Optimizer(c) if isinstance(c, torch.optim.Optimizer) else c for k, c in components.items()
        }
        self.components["rng"] = _Rng()
        self.required = (*required, "rng")
        self.extra, self.sidecars, self.keep = extra or {}, tuple(sidecars), keep

    def state_dict(self, step: int) -> dict:
        parts = {k: (c.state_dict() if c is not None else None) for k, c in self.components.items()}
        return {"step": step, **parts, **self.extra}

    def load_state_dict(self, state: dict) -> int:
        """Put ``state`` back into the components; returns its step."""
        for key, c in self.components.items():
            if key in self.required:
                if key not in state:
                    raise CheckpointError(f"the trainer state has no '{key}': it is not this trainer's")
                c.load_state_dict(state[key])
            elif c is not None and state.get(key):
                c.load_state_dict(state[key])
        return state["step"]

    def save(self, step: int, name: str) -> Path:
        """Checkpoint the state after ``step`` as ``final`` or ``checkpoints/step-N``."""
        path = self.run_dir / name if name == "final" else self.run_dir / "checkpoints" / name
        state = self.state_dict(step)  # on every rank: a sharded optimizer's moments are gathered
        weights = dist.full_model(self.model)  # fsdp: the whole weights, gathered (a collective)
        if dist.is_main():  # the replicas are equal: rank 0's weights and optimizer are everyone's
            for s in self.sidecars:  # first, so that every policy checkpoint has its sidecars
                s.save_beside(self.run_dir, name)
            save_checkpoint(path, weights, self.tok, state)
            prune_checkpoints(self.run_dir, self.keep)
            kept = {p.name for _, p in list_checkpoints(self.run_dir)}
            for s in self.sidecars:
                s.prune_beside(self.run_dir, kept)
        dist.barrier()
        return path

    def save_step(self, step: int) -> Path:
        return self.save(step, f"step-{step}")

    def after_step(self, step: int, every: int, stop, between=None) -> None:
        """After a step that is not the last: the checkpoint every ``every`` steps (0: none), then
        ``between()`` (a held-out eval), then a stop request (``stop``: a StopRequests), which may
        have come during the step, the save or ``between``: the step is saved, if it was not, and
        Interrupted raised. Every rank stops together."""
        saved = bool(every) and step % every == 0
        if saved:
            self.save_step(step)
        if between is not None:
            between()
        if dist.any_true(stop.requested):
            if not saved:
                self.save_step(step)
            raise Interrupted(
                f"{stop.name} during step {step}: saved checkpoints/step-{step}; continue with resume=true",
                stop.signum,
            )

    def restore(self, path: Path, state: dict) -> int:
        """Resume from the checkpoint at ``path`` whose trainer state is ``state`` (the weights
        were loaded with the model); returns its step."""
        step = self.load_state_dict(state)
        for s in self.sidecars:
            s.load_beside(self.run_dir, Path(path))
        log.info("resumed from %s at step %d", path, step)
        return step
