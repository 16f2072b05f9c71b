"""Pools of rollout workers: Ray actors (:class:`RayPool`) or in-process workers
(:class:`LocalPool`, the synchronous reference). Both split an iteration's groups over the
workers in uid order, so the split never changes what is sampled (ray_engine.py)."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import torch

from thinkrl.config import ConfigError
from thinkrl.distributed.ray_worker import (
    GroupJob,
    RolloutWorker,
    WeightSyncError,
    pack_state,
    worker_threads,
)
from thinkrl.trainer.guards import TrainingError

log = logging.getLogger(__name__)


def split(jobs: list[GroupJob], workers: list[int]) -> dict[int, list[GroupJob]]:
    """Round-robin in the given order: group i goes to ``workers[i % W]``."""
    out: dict[int, list[GroupJob]] = {w: [] for w in workers}
    for i, j in enumerate(jobs):
        out[workers[i % len(workers)]].append(j)
    return {w: js for w, js in out.items() if js}


def add_times(times: list[dict]) -> dict:
    return {"generate_s": sum(t["generate_s"] for t in times), "score_s": sum(t["score_s"] for t in times)}


@contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class LocalPool:
    """``distributed.rollout_workers`` workers in this process, run one after another at
    ``submit``: the synchronous reference. It splits work as :class:`RayPool` does, and runs
    each worker on as many torch threads as an actor gets, because both the batch a sequence
    shares and the thread count change its log-probs in the last float bits (its tokens are
    the same under any split: ray_engine.py)."""

    def __init__(self, cfg):
        self.threads = worker_threads(cfg)
        self.workers = {i: RolloutWorker(cfg, i) for i in range(cfg.distributed.rollout_workers)}

    def alive(self) -> int:
        return len(self.workers)

    def sync(self, state: dict, version: int, checksum: str) -> None:
        with torch_threads(self.threads):
            for w in self.workers.values():
                w.load_weights(version, state, checksum)

    def submit(self, jobs: list[GroupJob], version: int, budget: int):
        with torch_threads(self.threads):
            return [
                self.workers[wid].rollout(js, version, budget)
                for wid, js in split(jobs, sorted(self.workers)).items()
            ]

    def wait(self, handle) -> tuple[list[GroupJob], int, dict]:
        return [j for js, _ in handle for j in js], 0, add_times([t for _, t in handle])

    def close(self) -> None:
        pass


class RayPool:
    """``distributed.rollout_workers`` actors. Every remote call has a timeout; a worker that
    dies (``kill -9``) loses only the groups it held, which are counted, and is restarted by
    Ray up to ``ray.max_restarts`` times, then dropped."""

    def __init__(self, cfg):
        try:
            import ray
        except ImportError:
            raise ConfigError("distributed.backend=ray needs Ray: pip install 'thinkrl[ray]'") from None
        from thinkrl.distributed.ray_driver import worker_pythonpath

        self.cfg, self.owns, self.actors = cfg, False, {}
        self.group = None  # ray.weight_sync=collective: the driver's rank 0 of the weight group
        if not ray.is_initialized():
            try:
                ray.init(
                    address=cfg.ray.address,
                    num_cpus=cfg.ray.num_cpus if cfg.ray.address is None else None,
                    include_dashboard=False,
                    runtime_env={"env_vars": {"PYTHONPATH": worker_pythonpath()}},
                )
            except (ConnectionError, ValueError, RuntimeError) as e:
                where = (
                    f"join the Ray cluster at ray.address={cfg.ray.address}"
                    if cfg.ray.address
                    else "start a local Ray cluster"
                )
                raise ConfigError(f"could not {where}: {e}") from None
            self.owns = True
        try:
            self._start(ray)
        except BaseException:
            self.close()
            raise

    def _start(self, ray) -> None:
        cfg = self.cfg
        actor = ray.remote(RolloutWorker).options(
            max_restarts=cfg.ray.max_restarts,
            max_task_retries=0,
            num_cpus=cfg.ray.cpus_per_worker,
            num_gpus=cfg.ray.gpus_per_worker,
        )
        self.actors = {
            i: actor.remote(cfg, i, own_process=True) for i in range(cfg.distributed.rollout_workers)
        }
        self.pending: dict[int, list] = {i: [] for i in self.actors}  # rollout calls not yet collected
        need = f"{cfg.distributed.rollout_workers} x ray.cpus_per_worker={cfg.ray.cpus_per_worker:g}"
        if cfg.ray.gpus_per_worker:
            need += f" CPUs and ray.gpus_per_worker={cfg.ray.gpus_per_worker:g} GPUs"
        self._get(
            {i: a.pid.remote() for i, a in self.actors.items()},
            self.cfg.ray.sync_timeout_s,
            "start and load the model",
            hint=f"does the cluster have the {need} it needs?",
        )
        if cfg.ray.weight_sync == "collective":
            self._join(ray)

    def _join(self, ray) -> None:
        """Form the weight group: the driver as rank 0 (it hosts the store), worker i as rank i + 1."""
        from thinkrl.distributed import ray_collective

        timeout = self.cfg.ray.sync_timeout_s
        host, port, world = ray.util.get_node_ip_address(), ray_collective.free_port(), len(self.actors) + 1
        gpu = self.cfg.ray.gpus_per_worker > 0 and torch.cuda.is_available()
        self.backend, self.device = ("nccl", "cuda") if gpu else ("gloo", "cpu")
        calls = {
            i: a.join_weight_group.remote(host, port, world, i + 1, self.backend, timeout)
            for i, a in self.actors.items()
        }
        try:
            self.group = ray_collective.make_group(host, port, world, 0, self.backend, timeout)
        except RuntimeError as e:  # includes torch's DistStoreError: some rank never came
            raise WeightSyncError(
                f"the weight group ({self.backend}, {world} ranks at {host}:{port}) did not form within "
                f"ray.sync_timeout_s={timeout:g} s: {str(e).splitlines()[0]}"
            ) from None
        self._get(calls, timeout, "join the weight group")
        log.info(
            "weight sync: %s broadcast to %d workers (%s:%d)", self.backend, len(self.actors), host, port
        )

    def alive(self) -> int:
        return len(self.actors)

    def pids(self) -> dict[int, int]:
        import ray

        return {
            i: ray.get(a.pid.remote(), timeout=self.cfg.ray.sync_timeout_s) for i, a in self.actors.items()
        }

    def _lost(self, wid: int, err: Exception) -> None:
        """A call to worker ``wid`` failed because its process is gone: dead for good (Ray's
        ``max_restarts`` spent: the pool drops it) or being restarted by Ray."""
        from ray.exceptions import ActorUnavailableError

        if self.group is not None:
            raise WeightSyncError(
                f"rollout worker {wid} died ({type(err).__name__}); with ray.weight_sync=collective "
                "its weight group cannot go on without it, so the run stops (ray.weight_sync="
                "object_store drops or restarts dead workers)"
            )
        if isinstance(err, ActorUnavailableError):
            log.warning("rollout worker %d died; Ray restarts it and the next weight sync reloads it", wid)
            return
        log.warning(
            "rollout worker %d is gone and ray.max_restarts=%d is spent: dropping it (%s)",
            wid,
            self.cfg.ray.max_restarts,
            type(err).__name__,
        )
        self.actors.pop(wid, None)
        if not self.actors:
            raise TrainingError("every rollout worker died; see the Ray logs (/tmp/ray/session_latest/logs)")

    def _get(
        self,
        calls: dict,
        timeout: float,
        what: str,
        retry=None,
        hint: str = "ray.sync_timeout_s / ray.rollout_timeout_s",
    ) -> dict:
        """``ray.get`` of one call per worker, each within ``timeout`` s. A worker's own error
        (WeightSyncError) is raised as itself; a dead worker is left out of the result. With
        ``retry(wid)``, a call to a worker that Ray is restarting is made again until the
        timeout."""
        import ray
        from ray.exceptions import ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

        out = {}
        for wid, ref in calls.items():
            deadline = time.monotonic() + timeout
            while True:
                try:
                    out[wid] = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
                except GetTimeoutError:
                    raise WeightSyncError(
                        f"rollout worker {wid} did not {what} within {timeout:g} s ({hint}); "
                        "stopping rather than waiting forever"
                    ) from None
                except ActorUnavailableError as e:
                    if retry is not None and time.monotonic() < deadline:
                        time.sleep(0.5)
                        ref = retry(wid)
                        continue
                    self._lost(wid, e)
                except RayActorError as e:
                    self._lost(wid, e)
                except RayTaskError as e:
                    if isinstance(getattr(e, "cause", None), WeightSyncError):
                        raise WeightSyncError(str(e.cause)) from None
                    raise e.as_instanceof_cause() from None
                break
        return out

    def sync(self, state: dict, version: int, checksum: str) -> None:
        import ray

        # a worker confirms only after its rollout in flight, which has its own limit
        busy = [r for refs in self.pending.values() for r in refs]
        if busy:
            ready, _ = ray.wait(busy, num_returns=len(busy), timeout=self.cfg.ray.rollout_timeout_s)
            if len(ready) < len(busy):
                raise WeightSyncError(
                    f"a rollout iteration did not return within ray.rollout_timeout_s="
                    f"{self.cfg.ray.rollout_timeout_s:g} s; stopping rather than waiting forever"
                )
        if self.group is not None:
            return self._broadcast(state, version, checksum)
        ref = ray.put(pack_state(state))  # numpy arrays: zero-copy reads in the workers

        def call(wid):
            return self.actors[wid].load_weights.remote(version, ref, checksum)

        acks = self._get(
            {i: call(i) for i in self.actors},
            self.cfg.ray.sync_timeout_s,
            f"confirm the weights of policy version {version}",
            retry=call,
        )
        self._check_acks(acks, version, checksum)

    def _broadcast(self, state: dict, version: int, checksum: str) -> None:
        """ray.weight_sync=collective: every worker joins the broadcast (a Ray call each), rank 0
        sends; then the acknowledgements, as for the object store."""
        from thinkrl.distributed import ray_collective

        buckets = ray_collective.layout(state)
        calls = {i: a.receive_weights.remote(version, checksum, buckets) for i, a in self.actors.items()}
        try:
            ray_collective.send(self.group, state, buckets, self.device)
        except RuntimeError as e:  # a member gone (connection closed) or the group's timeout
            # a worker's own error, if it raised one, says more than the broken connection
            self._get(calls, self.cfg.ray.sync_timeout_s, "receive the broadcast")
            raise WeightSyncError(
                f"broadcasting the weights of policy version {version} failed: {str(e).splitlines()[0]}"
            ) from None
        acks = self._get(
            calls, self.cfg.ray.sync_timeout_s, f"confirm the weights of policy version {version}"
        )
        self._check_acks(acks, version, checksum)

    @staticmethod
    def _check_acks(acks: dict, version: int, checksum: str) -> None:
        for wid, ack in acks.items():
            if ack["version"] != version or ack["checksum"] != checksum:
                raise WeightSyncError(
                    f"rollout worker {wid} confirmed policy version {ack['version']} "
                    f"(checksum {ack['checksum']}) instead of {version} ({checksum})"
                )
        if not acks:
            raise TrainingError("no rollout worker confirmed the weights: every one died")

    def submit(self, jobs: list[GroupJob], version: int, budget: int):
        parts = split(jobs, sorted(self.actors))
        handle = []
        for wid, js in parts.items():
            ref = self.actors[wid].rollout.remote(js, version, budget)
            self.pending[wid].append(ref)
            handle.append((wid, ref, len(js)))
        return handle

    def wait(self, handle) -> tuple[list[GroupJob], int, dict]:
        """The groups an iteration returned, how many groups were lost with dead workers, and the
        workers' seconds (summed over workers)."""
        jobs, lost, times = [], 0, []
        for wid, ref, n in handle:
            got = self._get({wid: ref}, self.cfg.ray.rollout_timeout_s, "return its rollout iteration")
            if wid in self.pending and ref in self.pending[wid]:
                self.pending[wid].remove(ref)
            if wid in got:
                jobs += got[wid][0]
                times.append(got[wid][1])
            else:
                lost += n
        return jobs, lost, add_times(times)

    def close(self) -> None:
        import ray

        for a in self.actors.values():
            ray.kill(a, no_restart=True)
        self.actors = {}
        if self.owns:  # a second close does nothing
            ray.shutdown()
            self.owns = False
