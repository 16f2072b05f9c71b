"""Weight sync to Ray rollout workers, side by side: how the learner's weights travel.

Variants, each timed over ``--syncs`` syncs of the same model to ``--workers`` actors (the
first sync of each is a warm-up, left out of the mean):

- ``torch tensors``: the state dict of torch tensors through Ray's object store, as thinkrl
  sent it before (``ray.put(state)``; each worker's ``ray.get`` unpickles a copy);
- ``numpy arrays``: ``RayPool.sync`` today, the same dict as numpy arrays
  (``pack_state``), which pickle protocol 5 hands over out of band: written into the store
  once, read by the workers without a copy;
- ``collective``: ``ray.weight_sync=collective``, a gloo broadcast from the driver in a
  process group of the driver and the workers (NCCL on GPU workers; not run here).

Every variant ends with the worker checking the digest and loading the weights into its
engine, and confirms the version, so the times are the whole sync. The driver's own share
(cloning the weights and their digest, the same for every variant) is printed apart.

    python benchmarks/ray_weight_sync.py --model smollm2-135m --workers 1 --syncs 4
    python benchmarks/ray_weight_sync.py --model tiny-random --syncs 2      # smoke
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--syncs", type=int, default=4)
    args = ap.parse_args()

    import ray
    import torch

    from thinkrl.config import build_config
    from thinkrl.device import plan
    from thinkrl.distributed.ray_driver import worker_pythonpath
    from thinkrl.distributed.ray_pool import RayPool
    from thinkrl.distributed.ray_worker import state_checksum
    from thinkrl.models import load_model

    print(f"CPU: {plan().describe()}; torch {torch.__version__}, ray {ray.__version__}")
    ray.init(
        num_cpus=args.workers + 1,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": worker_pythonpath()}},
    )

    def cfg_for(weight_sync: str):
        return build_config(
            None,
            [
                f"model={args.model}",
                "dtype=fp32",
                "distributed.backend=ray",
                f"distributed.rollout_workers={args.workers}",
                "ray.sync_timeout_s=600",
                f"ray.weight_sync={weight_sync}",
            ],
        )

    model = load_model(args.model)[0]
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    mb = sum(v.numel() * v.element_size() for v in state.values()) / 2**20
    t0 = time.perf_counter()
    state = {k: v.clone() for k, v in state.items()}
    t1 = time.perf_counter()
    checksum = state_checksum(state)
    t2 = time.perf_counter()
    print(
        f"{args.model}: {len(state)} tensors, {mb:.0f} MiB; driver side, every variant: "
        f"clone {t1 - t0:.2f} s, digest {t2 - t1:.2f} s"
    )

    def timed(name: str, fn) -> float:
        times = []
        for v in range(1, args.syncs + 1):
            t = time.perf_counter()
            fn(v)
            times.append(time.perf_counter() - t)
        mean = statistics.mean(times[1:] or times)
        print(f"  {name:<14} s/sync {mean:6.2f}   ({', '.join(f'{x:.2f}' for x in times)})")
        return mean

    rows = {}
    pool = RayPool(cfg_for("object_store"))
    try:

        def torch_tensors(version: int) -> None:  # the object store, tensors pickled in band
            ref = ray.put(state)
            acks = ray.get([a.load_weights.remote(version, ref, checksum) for a in pool.actors.values()])
            assert all(a["version"] == version for a in acks)

        rows["torch tensors"] = timed("torch tensors", torch_tensors)
        rows["numpy arrays"] = timed("numpy arrays", lambda v: pool.sync(state, v, checksum))
    finally:
        pool.close()
    pool = RayPool(cfg_for("collective"))
    try:
        rows["collective"] = timed("collective", lambda v: pool.sync(state, v, checksum))
        print(f"  ({pool.backend} broadcast)")
    finally:
        pool.close()
        ray.shutdown()
    base = rows["torch tensors"]
    for name, s in rows.items():
        print(f"{name:<14} {s:6.2f} s per sync  {base / s:5.1f}x faster than torch tensors")


if __name__ == "__main__":
    main()
