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
the fast engine and the head-only log-prob path read.

Strategy ``fsdp`` (FSDP2, ``fully_shard``): the policy's weights, gradients and optimizer
state are sharded over the ranks (:func:`shard_policy`). See that function for why the whole
policy is one FSDP unit and why every rank runs the same number of passes (:func:`even_passes`).

Every function here is a no-op (no collective at all) when the world size is 1.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import itertools
import os
import weakref
import zlib

import torch
import torch.distributed as dist

from thinkrl.config import ConfigError

STRATEGIES = ("ddp", "fsdp")
_BUCKET = 1 << 24  # elements per gradient all-reduce (64 MiB in fp32)
_STRATEGY = "ddp"  # set by init()


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
    global _STRATEGY
    _STRATEGY = strategy
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if n <= 1 or dist.is_initialized():
        return world_size()
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
    # FSDP's gradients (DTensors) were reduce-scattered by its post-backward hooks already
    params = [q for q in params if q.requires_grad and not _is_dtensor(q)]
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
    if not buckets and out:  # every gradient is an FSDP shard: the extras travel alone
        t = torch.tensor(out, dtype=torch.float32, device=_comm_device())
        dist.all_reduce(t)
        return t.tolist()
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
# FSDP2: a sharded policy


def strategy() -> str:
    """How the policy is held across ranks: ``ddp`` (replicated) or ``fsdp`` (sharded)."""
    return _STRATEGY if world_size() > 1 else "ddp"


class _Root(torch.nn.Module):
    """The FSDP root around the HF policy. Its forward runs ``fn(policy, ...)``: the trainer's
    log-prob path calls the backbone (possibly several times: a grouped micro-batch runs the
    prompt once, then its completions) and reads the LM head's weight itself, so the whole of
    it must run inside one root forward, where FSDP has gathered the weights and from which it
    reduce-scatters their gradients after the backward."""

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, fn, *args, **kwargs):
        return fn(self.policy, *args, **kwargs)


@dataclasses.dataclass
class _Sharded:
    root: _Root
    mirror: torch.nn.Module  # full, unsharded copy: what the rollout engine runs and checkpoints save


_SHARDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # policy -> _Sharded


def shard_policy(model) -> None:
    """Under ``distributed.strategy=fsdp`` with many ranks, shard ``model``'s parameters in
    place with FSDP2 (``fully_shard``); otherwise do nothing. Call it after
    :func:`broadcast_parameters` and before building the optimizer (which must see the
    sharded parameters).

    - **One FSDP unit for the whole policy**, not one per decoder layer: FSDP's collectives run
      in its hooks, and every rank must run the same ones in the same order. The number of
      times the trainer calls a layer within one micro-batch depends on the data (a grouped
      micro-batch runs its prompt, then its packed completions, and a micro-batch of one-token
      completions runs no completion pass), so per-layer units would deadlock. One
      unit costs one all-gather in each forward and backward and one reduce-scatter per
      backward, whatever runs inside. Between passes each rank holds 1/N of the weights, of
      the gradients and of AdamW's moments; during a pass it holds the whole model.
    - ``reshard_after_forward=True`` for that root (FSDP keeps a root gathered after its
      forward by default): otherwise a no-grad forward would leave the full parameters
      registered on the model, and the optimizer and the grad-norm would see them.
    - Gradients are summed, not averaged (divide factor 1, SUM collectives: gloo has no
      PREMUL_SUM): the trainer already divides each loss by the global batch's counts.
    - Every parameter takes part in each reduce-scatter, with or without a gradient, so the
      ranks' collectives have the same size.
    - The tied input/output embedding of SmolLM2 is one parameter inside the one unit.
    - A full copy (``mirror``) is kept for the rollout engine, refreshed after each update by
      :func:`full_model`; checkpoints save it (full HF folders, whatever the world size).
    """
    if strategy() != "fsdp":
        return
    from torch.distributed.fsdp import fully_shard

    mirror = copy.deepcopy(model).requires_grad_(False)
    root = _Root(model)
    fully_shard(root, reshard_after_forward=True)
    root.set_gradient_divide_factor(1.0)
    root.set_force_sum_reduction_for_comms(True)
    root.set_reduce_scatter_unused_params(True)
    _SHARDED[model] = _Sharded(root, mirror)


def fsdp_root(model) -> torch.nn.Module | None:
    """The FSDP root whose forward must wrap every computation on ``model``, or None."""
    s = _SHARDED.get(model)
    return s.root if s is not None else None


def through_root(model, fn):
    """``fn`` (any computation on ``model`` followed by one backward of its result), run
    inside the FSDP root's forward when ``model`` is sharded; ``fn`` itself otherwise."""
    root = fsdp_root(model)
    if root is None:
        return fn
    return lambda *args, **kwargs: root(lambda _policy, *a, **k: fn(*a, **k), *args, **kwargs)


def full_model(model, refresh: bool = True):
    """``model`` with whole weights: itself unless it is sharded, else its full copy, first
    gathered from the shards when ``refresh`` (a collective: call it on every rank)."""
    s = _SHARDED.get(model)
    if s is None:
        return model
    if refresh:
        full = dict(s.mirror.named_parameters())
        with torch.no_grad():
            for name, q in model.named_parameters():
                full[name].copy_(q.full_tensor())
    return s.mirror


def even_passes(model, mbs: list):
    """Yield ``mbs``; when ``model`` is sharded, then run dummy passes until this rank has run
    as many as the rank with the most: FSDP's hooks gather (forward, backward) and
    reduce-scatter (backward) in every pass, so the ranks' pass counts must agree, and ranks
    differ in how many micro-batches they hold (a rank whose groups all have zero advantage
    skips them; a mini-batch may hold no group of a rank; dynamic sampling keeps different
    numbers). A dummy pass is one token through the model; under autograd it back-propagates
    zero, adding nothing to the gradients."""
    s = _SHARDED.get(model)
    if s is None:
        yield from mbs
        return
    t = torch.tensor([len(mbs)], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    yield from mbs
    for _ in range(int(t) - len(mbs)):
        out = s.root(_dummy_pass)
        if out.requires_grad:
            out.backward()


def _dummy_pass(policy) -> torch.Tensor:
    dev = policy.get_input_embeddings().weight.device
    logits = policy(input_ids=torch.zeros(1, 1, dtype=torch.long, device=dev)).logits  # [1, 1, V]
    return logits.float().sum() * 0.0


def optimizer_state(optimizer) -> dict:
    """The optimizer's state dict with whole tensors (a sharded policy's moments gathered: a
    collective, call it on every rank), in ``torch.optim``'s own format, so a checkpoint
    resumes on any world size and with either strategy."""
    sd = optimizer.state_dict()
    if not any(_is_dtensor(v) for st in sd["state"].values() for v in st.values()):
        return sd
    state = {
        i: {k: v.full_tensor() if _is_dtensor(v) else v for k, v in st.items()}
        for i, st in sd["state"].items()
    }
    return {**sd, "state": state}


def load_optimizer_state(optimizer, sd: dict) -> None:
    """Load a state dict of whole tensors (:func:`optimizer_state`); for sharded parameters
    each rank keeps its shard of every moment."""
    params = [q for g in optimizer.param_groups for q in g["params"]]
    if any(_is_dtensor(q) for q in params):
        from torch.distributed.tensor import distribute_tensor

        ids = [i for g in sd["param_groups"] for i in g["params"]]
        state = {}
        for i, st in sd["state"].items():
            q = params[ids.index(i)]
            state[i] = {
                k: distribute_tensor(v.to(q.device), q.device_mesh, q.placements, src_data_rank=None)
                if _is_dtensor(q) and torch.is_tensor(v) and v.shape == q.shape
                else v
                for k, v in st.items()
            }
        sd = {**sd, "state": state}
    optimizer.load_state_dict(sd)


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


# ---------------------------------------------------------------------------
# RL batches


class GroupSeeds:
    """The per-group sampling seeds of one step (``distributed.seed_by_group``): group ``g`` of
    the step (counted over the draws of all rounds in global order) gets
    ``group_seed(seed, step, g)``, on whatever rank runs it."""

    def __init__(self, seed: int, step: int):
        self.seed, self.step = seed, step

    def starting_at(self, index: int):
        return (group_seed(self.seed, self.step, g) for g in itertools.count(index))


def collect_groups(draw, run, n: int, *, dynamic: bool, max_rounds: int, seeds=None):
    """The step's scored groups: ``(kept, seen, stats)`` as :func:`thinkrl.sampling.collect_groups`
    returns them, where ``kept`` is this rank's share of the groups to train on and ``seen``
    is every group generated this step by any rank, in the one process's order.
    ``run(examples, seeds)`` generates and scores; ``seeds`` is a :class:`GroupSeeds`, one
    int (one batched engine call per round) or None.

    With many ranks every round is decided globally, as one process decides it:

    - each round draws the same prompts on every rank (the sampler's state stays equal) and
      rank r runs its contiguous share (uneven when a refill does not split over the ranks);
    - the round's groups are gathered; the varied ones (DAPO's filter, Yu et al. 2025) are
      kept in global order, and refills ask for ``n - kept`` more, until ``n`` or
      ``max_rounds``;
    - the kept groups are then dealt out again in equal contiguous shares, so every rank
      trains on as many groups. When ``max_rounds`` stopped short of ``n`` and the kept
      count does not split over the ranks, its remainder (fewer than N groups) is dropped
      (``dynamic_dropped_groups``): there, and only there, N ranks train on other groups
      than one process.
    """
    from thinkrl.sampling import collect_groups as collect_local

    def seeds_for(start: int, rnd: int):  # this rank's seeds for a share that starts at global group `start`
        if isinstance(seeds, GroupSeeds):
            return seeds.starting_at(start)
        if isinstance(seeds, int) and rnd:
            return zlib.crc32(f"{seeds}/{rnd}".encode())
        return seeds

    if world_size() == 1:
        it = seeds_for(0, 0)  # one iterator over the rounds: group g of the step gets seed g
        return collect_local(draw, lambda exs: run(exs, it), n, dynamic=dynamic, max_rounds=max_rounds)
    seen_parts, kept_parts = [], []
    done, kept_n, rnd = 0, 0, 0
    while True:
        m = n - kept_n
        items = draw(m)
        lo, hi = rank() * m // world_size(), (rank() + 1) * m // world_size()
        mine = run(items[lo:hi], seeds_for(done + lo, rnd)) if hi > lo else None
        if not dynamic:
            return mine, gather_groups(mine, items), {}
        whole = gather_groups(mine, items)  # this round's groups, every rank's, in draw order
        seen_parts.append(whole)
        kept_parts.append(whole.select(whole.varied()))
        kept_n += len(kept_parts[-1])
        done += m
        if kept_n >= n or rnd >= max_rounds:
            break
        rnd += 1
    from thinkrl.sampling import Groups

    kept = Groups.concat(kept_parts)
    k = len(kept) // world_size()
    stats = {
        "dynamic_rounds": rnd,
        "dynamic_kept_groups": k * world_size(),
        "dynamic_generated_groups": done,
    }
    if len(kept) % world_size():
        stats["dynamic_dropped_groups"] = len(kept) % world_size()
    return kept.select(list(range(rank() * k, (rank() + 1) * k))), Groups.concat(seen_parts), stats


def gather_groups(local, drawn: list):
    """Every rank's scored groups, in global order (a :class:`thinkrl.sampling.Groups`), for
    the metrics, the samples and the sampler's success tracking. ``drawn`` is the global draw
    of this step: it replaces the examples that travelled (sent without their task), so the
    sampler sees its own example objects."""
    if world_size() == 1:
        return local
    from dataclasses import replace

    from thinkrl.sampling import Groups

    light = None  # a rank with no share of the draw sends nothing
    if local is not None:
        light = replace(local, examples=[replace(ex, source=None) for ex in local.examples])
    out = Groups.concat([g for g in all_gather_objects(light) if g is not None])
    out.examples = list(drawn)
    return out


def gather_rows(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Every rank's [n, T] tensors stacked in rank order (T padded with zeros to the widest),
    for statistics over the global batch; in one process, the tensors themselves."""
    if world_size() == 1:
        return tensors
    parts = all_gather_objects([t.cpu() for t in tensors])
    Tg = max(p[0].shape[1] for p in parts)
    return tuple(
        torch.cat([torch.nn.functional.pad(p[i], (0, Tg - p[i].shape[1])) for p in parts])
        for i in range(len(tensors))
    )


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
