"""Data-parallel training with ``torch.distributed``: one process per device, launched by
``torchrun --nproc_per_node=N -m thinkrl train ...`` (docs/distributed.md).

What each rank holds and does (strategy ``ddp``, the default):

- the whole policy (and reference), replicated: rank 0's weights are broadcast at the start
  and every rank applies the same summed gradient, so the replicas stay equal;
- its share of each step's prompts: the global batch is drawn identically on every rank and
  rank r keeps groups ``r*k .. r*k+k-1`` (k = prompts_per_step / N), so a GRPO group never
  spans two ranks;
- one coalesced gradient all-reduce per optimizer step (SUM), after all its micro-batches.
  The trainer divides each micro-batch's loss by the *global* token (or row) count of the
  mini-batch, so the sum over ranks is exactly the one-process loss of the global batch.

Why not ``torch.nn.parallel.DistributedDataParallel``: its per-backward all-reduce needs
every rank to run the same number of backward passes, but a rank whose groups all have zero
advantage skips them (thinkrl/trainer/rl.py), and the wrapper would hide the HF model that
the fast engine and the head-only log-prob path read. FSDP2 (``fully_shard``) works on CPU
with gloo in torch 2.13 (checked), but the trainer calls the backbone and the LM head
separately and the fast engine copies full weights, neither of which a sharded module
allows yet: ``distributed.strategy=fsdp`` is refused with a ConfigError until that is done.

Every function here is a no-op (no collective at all) when the world size is 1.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import zlib

import torch
import torch.distributed as dist

from thinkrl.config import ConfigError

STRATEGIES = ("ddp", "fsdp")
_BUCKET = 1 << 24  # elements per gradient all-reduce (64 MiB in fp32)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if world_size() > 1 else 0


def is_main() -> bool:
    return rank() == 0


def init(strategy: str = "ddp") -> int:
    """Join the process group that torchrun describes in the environment (``WORLD_SIZE``,
    ``RANK``, ``MASTER_ADDR``, ...); gloo on CPU, NCCL on CUDA. Returns the world size;
    without torchrun (or with one process) nothing happens."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"distributed.strategy '{strategy}' unknown; choose from: {', '.join(STRATEGIES)}")
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if n <= 1 or dist.is_initialized():
        return world_size()
    if strategy == "fsdp":
        raise ConfigError(
            "distributed.strategy=fsdp is not supported by the trainers yet (they call the backbone "
            "and LM head of the policy separately, which a fully_shard module does not allow); "
            "use distributed.strategy=ddp"
        )
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # Rank 0 alone runs the held-out evals and writes checkpoints while the others wait in
    # the next collective: the timeout must outlast them.
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=4))
    return world_size()


def close() -> None:
    """Leave the process group. The ranks first wait for each other (rank 0 may still be writing
    final/): tearing gloo down while a peer still holds the connection can abort the process
    ("terminate called without an active exception"). The wait is bounded, so a rank whose peer
    died still exits."""
    if world_size() > 1:
        if dist.get_backend() == "gloo":
            try:
                dist.monitored_barrier(timeout=datetime.timedelta(minutes=5))
            except RuntimeError:
                pass  # a peer is gone: nothing left to wait for
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (builds a model cache, tidies a run folder after a crash),
    then the others, which find the work done."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def check_divisible(n: int, what: str) -> None:
    if n % world_size():
        raise ConfigError(
            f"{what}={n} does not split over {world_size()} processes: make it a multiple of "
            f"{world_size()} (each process takes whole groups)"
        )


def shard(items: list) -> list:
    """This rank's contiguous share of ``items`` (whose length the world size divides)."""
    n = world_size()
    if n == 1:
        return items
    k = len(items) // n
    return items[rank() * k : (rank() + 1) * k]


def group_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of group ``index`` (in the global batch) of ``step``: a function of
    nothing else, so a group's completions do not depend on the world size."""
    return zlib.crc32(f"{seed}/{step}/{index}".encode())


def _comm_device() -> torch.device:
    """Where collectives' tensors must live: NCCL reduces CUDA tensors only."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


# ---------------------------------------------------------------------------
# Collectives on plain values


def all_gather_objects(obj) -> list:
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def sum_floats(values: list[float]) -> list[float]:
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def any_true(flag: bool) -> bool:
    """True on every rank when it is true on one (a signal, a time limit): ranks stop together."""
    if world_size() == 1:
        return flag
    return sum_floats([float(bool(flag))])[0] > 0


def reduce_dict(d: dict, max_keys: tuple = ()) -> dict:
    """Sum of the ranks' dicts key by key (the union of their keys), max for ``max_keys``."""
    if world_size() == 1:
        return d
    out: dict = {}
    for part in all_gather_objects(d):
        for k, v in part.items():
            out[k] = (max(out[k], v) if k in max_keys else out[k] + v) if k in out else v
    return out


# ---------------------------------------------------------------------------
# Model state


def broadcast_parameters(model) -> None:
    """Give every rank rank 0's weights (and buffers), as DDP does at construction."""
    if world_size() == 1:
        return
    dev = _comm_device()
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            x = t.data.to(dev)
            dist.broadcast(x, src=0)
            if x is not t.data:  # a CPU model under NCCL: the copy went over the GPU
                t.data.copy_(x)


def sum_gradients(params, *extra: float) -> list[float]:
    """All-reduce (SUM) the gradients of ``params`` in place, in buckets, and the ``extra``
    scalars with them (one collective less); returns the summed extras. A parameter without
    a gradient on this rank counts as zeros, and gets the sum (a rank may run no backward)."""
    if world_size() == 1:
        return list(extra)
    params = [q for q in params if q.requires_grad]
    for q in params:
        if q.grad is None:
            q.grad = torch.zeros_like(q)
    buckets, cur, size = [], [], 0
    for q in params:
        cur.append(q)
        size += q.numel()
        if size >= _BUCKET:
            buckets.append(cur)
            cur, size = [], 0
    if cur:
        buckets.append(cur)
    out = list(extra)
    for i, b in enumerate(buckets):
        dev = _comm_device()
        tail = torch.tensor(out if i == 0 else [], dtype=torch.float32, device=dev)
        flat = torch.cat([q.grad.reshape(-1).float().to(dev) for q in b] + [tail])
        dist.all_reduce(flat)
        at = 0
        for q in b:
            q.grad.copy_(flat[at : at + q.numel()].view_as(q.grad))
            at += q.numel()
        if i == 0:
            out = flat[at:].tolist()
    return out


# ---------------------------------------------------------------------------
# RL batches


def sharded_draw(draw):
    """Wrap a sampler's ``next_batch(n)``: every rank draws the same ``n`` prompts (the
    sampler's state stays equal everywhere) and keeps its share. The whole draw is kept
    on the wrapper (``.last``), for :func:`gather_groups`."""

    def next_batch(n: int) -> list:
        next_batch.last = draw(n)
        return shard(next_batch.last)

    next_batch.last = []
    return next_batch


def gather_groups(local, drawn: list):
    """Every rank's scored groups, in global order (a :class:`thinkrl.sampling.Groups`), for
    the metrics, the samples and the sampler's success tracking. ``drawn`` is the global draw
    of this step: it replaces the examples that travelled (sent without their task), so the
    sampler sees its own example objects."""
    if world_size() == 1:
        return local
    from dataclasses import replace

    from thinkrl.sampling import Groups

    light = replace(local, examples=[replace(ex, source=None) for ex in local.examples])
    out = Groups.concat(all_gather_objects(light))
    out.examples = list(drawn)
    return out


def advantages(estimator, inp, whole_batch: bool):
    """``estimator(inp)`` for this rank's rows. A group estimator runs on local rows (a group
    is never split); one that normalises over the whole batch (``whole_batch``, e.g. the
    whitening of REINFORCE++) runs on the gathered global batch, and each rank keeps its rows."""
    if world_size() == 1 or not whole_batch:
        return estimator(inp)
    from dataclasses import fields, replace

    N, T = inp.mask.shape
    names = [f.name for f in fields(inp) if isinstance(getattr(inp, f.name), torch.Tensor)]
    parts = all_gather_objects({k: getattr(inp, k) for k in names})
    Tg = max(p["mask"].shape[1] for p in parts)
    offset = 0
    merged: dict = {k: [] for k in names}
    for p in parts:
        for k in names:
            v = p[k]
            if k == "group_ids":
                v = v - v.min() + offset  # distinct ids across ranks
            elif v.dim() == 2:
                v = torch.nn.functional.pad(v, (0, Tg - v.shape[1]))
            merged[k].append(v)
        offset = int(merged["group_ids"][-1].max()) + 1
    est = estimator(replace(inp, **{k: torch.cat(v) for k, v in merged.items()}))
    start = sum(p["mask"].shape[0] for p in parts[: rank()])
    rows = slice(start, start + N)
    est.adv = est.adv[rows, :T]
    if est.returns is not None:
        est.returns = est.returns[rows, :T]
    return est
