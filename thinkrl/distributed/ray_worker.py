"""A rollout worker: an engine plus the rewards, beside each other (Kimi k1.5's rollout workers).

A plain class: the Ray pool (ray_driver.py) makes it an actor, and the in-process pool of
the synchronous reference run calls it directly. It holds the weights of one policy version
and refuses work for any other, so a missed weight sync is an error, never a silent run on
old weights.
"""

from __future__ import annotations

import hashlib
import os
import time
import zlib
from dataclasses import dataclass, field

import torch

from thinkrl.distributed.ray_engine import Seq, build_worker_engine
from thinkrl.rollout import SamplingParams
from thinkrl.trainer.guards import TrainingError


class WeightSyncError(TrainingError):
    """A worker missed a weight sync, got corrupted weights, answered with the wrong version or
    not in time. A TrainingError, so ``thinkrl train`` prints it as one line and exits non-zero."""


def state_checksum(state: dict) -> str:
    """A digest of a state dict: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def pack_state(state: dict) -> dict:
    """A state dict as numpy arrays, for Ray's object store: numpy buffers travel out of band
    (pickle protocol 5), written into the store once and read by a worker on the same node
    without a copy, where pickling torch tensors copies every byte on both sides (smollm2-135m:
    benchmarks/ray_weight_sync.py). bf16, which numpy lacks, travels as its int16 bits."""
    out = {}
    for name, t in state.items():
        t = t.detach().cpu().contiguous()
        bits = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        out[name] = (bits.numpy(), str(t.dtype).removeprefix("torch."))
    return out


def unpack_state(packed: dict) -> dict:
    """The tensors of :func:`pack_state`'s arrays (sharing their memory: read them, or copy)."""
    import warnings

    out = {}
    with warnings.catch_warnings():  # arrays from the object store are read-only; nothing writes them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, (a, dtype) in packed.items():
            t = torch.from_numpy(a)
            out[name] = t.view(torch.bfloat16) if dtype == "bfloat16" else t
    return out


def is_packed(state: dict) -> bool:
    return bool(state) and isinstance(next(iter(state.values())), tuple)


@dataclass
class GroupJob:
    """The G samples of one prompt, moving between the driver and the workers until done."""

    uid: int  # group id in draw order: batches are sorted by it, whatever finished first
    rendered: tuple  # (prompt text, prefill)
    example: object
    seqs: list[Seq]
    texts: list[str] = field(default_factory=list)  # prefill + completion, once scored
    totals: list[float] = field(default_factory=list)
    parts: dict = field(default_factory=dict)
    # multi-turn episodes (thinkrl/envs): per sequence, 1 on policy tokens, 0 on observations,
    # and the turn-by-turn records; None for single-turn completions
    loss_masks: list[list[int]] | None = None
    episodes: list[dict] | None = None

    @property
    def done(self) -> bool:
        return all(s.done for s in self.seqs)


def worker_threads(cfg) -> int:
    """The torch threads a rollout worker runs on: ``threads`` if set, else the whole CPUs it
    reserves (``ray.cpus_per_worker``, at least 1; Ray's own OMP_NUM_THREADS for an actor)."""
    return cfg.threads or max(1, int(cfg.ray.cpus_per_worker))


class RolloutWorker:
    def __init__(self, cfg, worker_id: int, own_process: bool = False):
        from thinkrl.device import use_bf16
        from thinkrl.envs import build_env
        from thinkrl.models import load_model
        from thinkrl.plugins import load_plugins
        from thinkrl.rewards import RewardModel

        if own_process:  # an actor; in the driver's process LocalPool sets the threads per call
            torch.set_num_threads(worker_threads(cfg))
        load_plugins(cfg.plugins)  # what the user registered (rewards, tasks, envs) exists here too
        self.cfg, self.worker_id = cfg, worker_id
        model, self.tok = load_model(cfg.model)
        model.requires_grad_(False)
        bf16 = use_bf16(cfg.dtype)
        self.engine = build_worker_engine(cfg, model, self.tok, bf16)
        self.rewards = RewardModel(cfg.rewards, cfg.reward_args)
        env = build_env(cfg.env)
        self.env, self.episode_engine = None, None
        if env.multi_turn:  # episodes run on the single-process engine, beside the seeded one
            from thinkrl.rollout import build_engine

            self.env = env
            self.episode_engine = build_engine(
                cfg.rollout.backend, model, self.tok, batch_size=cfg.rollout.batch_size, bf16=bf16
            )
        self.version: int | None = None  # no policy until the first sync
        self.group, self.received_bytes = None, 0  # the weight group (ray.weight_sync=collective)
        self.delay_s = 0.0  # tests only: sleep this long inside each rollout (to kill a worker mid-step)

    def pid(self) -> int:
        return os.getpid()

    # -- ray.weight_sync=collective (ray_collective.py) ------------------------------------

    def join_weight_group(
        self, host: str, port: int, world: int, rank: int, backend: str, timeout_s: float
    ) -> int:
        from thinkrl.distributed import ray_collective

        self.group = ray_collective.make_group(host, port, world, rank, backend, timeout_s)
        self.group_device = "cuda" if backend == "nccl" else "cpu"
        return rank

    def receive_weights(self, version: int, checksum: str, buckets: list) -> dict:
        """Take part in the broadcast of the weights of ``version``, then check and load them as
        :meth:`load_weights` does."""
        from thinkrl.distributed import ray_collective

        if self.group is None:
            raise WeightSyncError(
                f"rollout worker {self.worker_id} is in no weight group: it cannot receive a broadcast"
            )
        try:
            state, nbytes = ray_collective.receive(self.group, buckets, self.group_device)
        except RuntimeError as e:
            raise WeightSyncError(
                f"rollout worker {self.worker_id}: the broadcast of policy version {version} failed "
                f"({str(e).splitlines()[0]})"
            ) from None
        self.received_bytes += nbytes
        return self.load_weights(version, state, checksum)

    def received(self) -> int:
        """Bytes of weights this worker received through its weight group so far."""
        return self.received_bytes

    def set_delay(self, seconds: float) -> None:
        self.delay_s = seconds

    def load_weights(self, version: int, state: dict, checksum: str) -> dict:
        """Take the learner's weights of ``version`` (tensors, or :func:`pack_state`'s arrays);
        refuse them if their digest is not ``checksum``."""
        if is_packed(state):
            state = unpack_state(state)
        got = state_checksum(state)
        if got != checksum:
            raise WeightSyncError(
                f"rollout worker {self.worker_id}: the weights of policy version {version} arrived "
                f"with checksum {got} but the learner sent {checksum}; they were corrupted on the "
                "way, so this worker refuses them"
            )
        self.engine.load_state_dict(state, version)
        if self.episode_engine is not None:  # its copy of the weights follows the model's
            self.episode_engine.sync_weights(self.engine.model)
        self.version = version
        return {"worker": self.worker_id, "version": version, "checksum": got}

    def rollout(self, jobs: list[GroupJob], version: int, budget: int) -> tuple[list[GroupJob], dict]:
        """Continue every unfinished sequence of ``jobs`` by at most ``budget`` tokens with the
        weights of ``version``, and score the groups that are now complete. Returns the jobs and
        this worker's seconds spent generating and scoring (the cost model's g)."""
        if self.version != version:
            raise WeightSyncError(
                f"rollout worker {self.worker_id} holds policy version {self.version} but was asked "
                f"to sample with version {version}: it missed a weight sync"
            )
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.env is not None:
            return self._episodes(jobs, version)
        r = self.cfg.rollout
        params = SamplingParams(
            max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k
        )
        t0 = time.perf_counter()
        seqs = [s for j in jobs for s in j.seqs]
        for s in seqs:
            if not s.done and s.iters + 1 >= r.partial_max_iters:
                budget_s = r.max_new_tokens  # a sequence's last allowed iteration runs it to the end
                self.engine.continue_([s], budget_s, params, self.cfg.seed, version)
        self.engine.continue_(seqs, budget, params, self.cfg.seed, version)
        t1 = time.perf_counter()
        self._score([j for j in jobs if j.done and not j.totals])
        return jobs, {"generate_s": t1 - t0, "score_s": time.perf_counter() - t1}

    def _episodes(self, jobs: list[GroupJob], version: int) -> tuple[list[GroupJob], dict]:
        """Each group's G multi-turn episodes, run to their end and scored here (tool calls in the
        worker's sandbox), one group at a time from a seed of (run seed, group uid): what a
        group samples depends on neither the worker nor the other groups."""
        from thinkrl.envs.episodes import generate_and_score_episodes

        t = {"time_generate": 0.0, "time_score": 0.0}
        for j in jobs:
            seed = zlib.crc32(f"{self.cfg.seed}/ray-group/{j.uid}".encode())
            g = generate_and_score_episodes(
                self.episode_engine,
                self.tok,
                self.env,
                self.rewards,
                self.cfg,
                [j.example],
                t,
                seeds=iter([seed]),
            )
            ro = g.ro
            j.rendered = g.rendered[0]  # the environment's opening messages, through the template
            for k, s in enumerate(j.seqs):
                s.prompt_ids, s.tokens = ro.prompt_ids[k], list(ro.completion_ids[k])
                s.logps = list(ro.logps[k]) if ro.logps is not None else [0.0] * len(s.tokens)
                s.versions = [version] * len(s.tokens)
                s.iters, s.done, s.truncated = s.iters + 1, True, ro.truncated[k]
            j.loss_masks, j.episodes = ro.loss_mask, ro.episodes
            j.texts, j.totals = list(g.texts), list(g.totals)
            j.parts = {k: list(v) for k, v in g.parts.items()}
        return jobs, {"generate_s": t["time_generate"], "score_s": t["time_score"]}

    def _score(self, jobs: list[GroupJob]) -> None:
        if not jobs:
            return
        G = len(jobs[0].seqs)
        comps = [self.tok.decode(s.tokens, skip_special_tokens=True) for j in jobs for s in j.seqs]
        texts = [j.rendered[1] + comps[i * G + k] for i, j in enumerate(jobs) for k in range(G)]
        exs = [j.example for j in jobs for _ in range(G)]
        seqs = [s for j in jobs for s in j.seqs]
        totals, parts = self.rewards.score(
            texts,
            exs,
            group_size=G,
            context={
                "num_tokens": [len(s.tokens) for s in seqs],
                "max_tokens": self.cfg.rollout.max_new_tokens,
                "truncated": [s.truncated for s in seqs],
            },
        )
        for i, j in enumerate(jobs):
            rows = slice(i * G, (i + 1) * G)
            j.texts, j.totals = texts[rows], list(totals[rows])
            j.parts = {k: list(v[rows]) for k, v in parts.items()}
