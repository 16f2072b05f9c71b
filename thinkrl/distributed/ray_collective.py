"""``ray.weight_sync=collective``: the learner's weights broadcast to the rollout workers through
a torch process group of their own (gloo on CPU, NCCL on GPU), not through Ray's object store.

The group has the driver as rank 0 and the W workers as ranks 1..W. It is built directly from
a ``TCPStore`` and a backend object, never with ``torch.distributed.init_process_group``: the
default group is the data-parallel one of ``thinkrl/distributed/torch_dist.py``, which would
otherwise count the workers as training ranks. Per sync:

    driver -> each worker (a Ray call): version, checksum, the layout of the buckets
    driver -> all (broadcast from rank 0): the weights, a few flat same-dtype buckets
    each worker: rebuilds the named tensors, checks the digest, loads them, confirms

Every step has a deadline (``ray.sync_timeout_s``): the group's own timeout, and the Ray
calls' (ray_pool.py). A collective cannot go on without one of its members, so with this
path a dead worker stops the run with one message; ``ray.weight_sync=object_store`` (the
default) drops or restarts workers instead.
"""

from __future__ import annotations

import datetime
import socket

import torch

BUCKET_BYTES = 64 << 20  # a bucket is one broadcast: few collectives, bounded extra memory


def layout(state: dict) -> list[tuple[str, list[tuple[str, tuple, int]]]]:
    """The buckets of a state dict, in name order: ``[(dtype, [(name, shape, numel), ...]), ...]``;
    a bucket holds consecutive tensors of one dtype, up to BUCKET_BYTES (or one larger tensor)."""
    out: list = []
    size = 0
    for name in sorted(state):
        t = state[name]
        dtype, nbytes = str(t.dtype).removeprefix("torch."), t.numel() * t.element_size()
        if not out or out[-1][0] != dtype or (size + nbytes > BUCKET_BYTES and out[-1][1]):
            out.append((dtype, []))
            size = 0
        out[-1][1].append((name, tuple(t.shape), t.numel()))
        size += nbytes
    return out


def _wire(flat: torch.Tensor) -> torch.Tensor:
    """What goes over the wire: bf16 as its int16 bits (gloo does not broadcast every float type)."""
    return flat.view(torch.int16) if flat.dtype == torch.bfloat16 else flat


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def make_group(host: str, port: int, world: int, rank: int, backend: str, timeout_s: float):
    """Rank ``rank`` of a standalone process group of ``world`` ranks (rank 0 hosts the store)."""
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world, rank == 0, timeout=timeout, wait_for_workers=False)
    store = dist.PrefixStore("thinkrl_weights", store)
    if backend == "nccl":  # written for GPU workers; never run (docs/distributed-ray.md)
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(store, rank, world, opts)
    return dist.ProcessGroupGloo(store, rank, world, timeout)


def broadcast(group, tensor: torch.Tensor) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([_wire(tensor)], opts).wait()


def send(group, state: dict, buckets: list, device: str) -> None:
    """Rank 0: broadcast ``state`` bucket by bucket."""
    for _, items in buckets:
        flat = torch.cat([state[name].detach().reshape(-1) for name, _, _ in items]).to(device)
        broadcast(group, flat)


def receive(group, buckets: list, device: str) -> tuple[dict, int]:
    """Ranks 1..W: the state dict rank 0 broadcast (on the CPU), and the bytes received."""
    state, nbytes = {}, 0
    for dtype, items in buckets:
        flat = torch.empty(sum(n for _, _, n in items), dtype=getattr(torch, dtype), device=device)
        broadcast(group, flat)
        nbytes += flat.numel() * flat.element_size()
        flat = flat.cpu()
        at = 0
        for name, shape, n in items:
            state[name] = flat[at : at + n].view(shape)
            at += n
    return state, nbytes
