"""distributed.backend=ray on a local Ray cluster (one per module): rollout workers, weight
sync that fails loudly, bounded staleness, partial rollouts, a killed worker."""

import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from thinkrl.cli import main  # noqa: E402
from thinkrl.config import build_config  # noqa: E402
from thinkrl.distributed.ray_driver import Driver, to_groups, worker_pythonpath  # noqa: E402
from thinkrl.distributed.ray_engine import Seq  # noqa: E402
from thinkrl.distributed.ray_pool import RayPool  # noqa: E402
from thinkrl.distributed.ray_worker import GroupJob, RolloutWorker, WeightSyncError, state_checksum  # noqa: E402

# tiny-random's completions are random bytes, whose rewards are all 0: the entropy bonus makes
# every update move the weights, through the sampled tokens and the behaviour log-probs.
TINY = [
    "model=tiny-random",
    "dtype=fp32",
    "threads=1",
    "rollout.prompts_per_step=2",
    "rollout.group_size=2",
    "rollout.max_new_tokens=16",
    "rollout.temperature=1.0",
    "algo.entropy_coef=0.01",
    "algo.tis_cap=2.0",
    "eval.before=false",
    "eval.after=false",
    "plot=false",
    "progress=false",
    "save_every=0",
    "optim.lr=1e-3",
    "distributed.backend=ray",
    "distributed.rollout_workers=2",
]
TIMING = ("time_", "worker_time_", "step_time", "tokens_per_s")
LOGP_DERIVED = ("logp_mismatch", "tis_weight", "loss", "grad_norm", "entropy", "ratio", "clip_frac", "kl")


def compared(m: dict) -> list[str]:
    """The metrics two runs must agree on: all but timings and the pool's own size."""
    return [k for k in m if not k.startswith(TIMING) and k not in ("rollout_workers", "worker_share")]


def assert_same_steps(ms: list[dict], ma: list[dict]) -> None:
    """Per-step metrics equal bit for bit (as JSON, so NaN equals NaN), step for step."""
    for a, b in zip(ms, ma, strict=True):
        keep = compared(a)
        assert json.dumps({k: a[k] for k in keep}) == json.dumps({k: b[k] for k in keep})


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ray.init(
        num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": worker_pythonpath()}}
    )
    yield
    ray.shutdown()


def cfg_of(tmp_path, *extra):
    return build_config(None, TINY + [f"output_dir={tmp_path}", *extra])


def test_workers_import_this_thinkrl():
    import thinkrl

    @ray.remote(num_cpus=0)
    def where():
        import thinkrl as t

        return t.__file__

    assert ray.get(where.remote(), timeout=60) == thinkrl.__file__


def test_train_cli_async_partial(tmp_path):
    rc = main(
        [
            "train",
            *TINY,
            f"output_dir={tmp_path}",
            "max_steps=3",
            "rollout.max_staleness=1",
            "rollout.partial_tokens=8",
        ]
    )
    assert rc == 0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert 0 <= r["staleness_mean"] <= r["staleness_max"] <= 1 + 4  # max_staleness + partial_max_iters
        shares = {k: v for k, v in r.items() if k.startswith("token_share/lag")}
        assert abs(sum(shares.values()) - 1) < 1e-9
        assert r["seq_iters_max"] == 2  # 16 tokens in segments of 8
        assert r["dropped_seqs"] == 0 and r["worker_time_generate"] > 0 and 0 < r["worker_share"] < 1
    # step 1 trains on tokens of version 0 only; later steps on batches sampled one update behind
    assert rows[0]["staleness_max"] == 0
    assert rows[1]["token_share/lag1"] > 0
    assert (tmp_path / "final" / "config.json").is_file()


def test_staleness0_async_equals_sync(tmp_path):
    """The Ray run with max_staleness=0 (2 worker actors, rollouts in flight while the
    driver waits) equals the synchronous in-process run (the same 2 workers called one after
    another, no Ray) step for step: metrics and weights, bit for bit in fp32."""
    runs = {}
    for name, local in (("sync", True), ("async", False)):
        d = Driver(cfg_of(tmp_path / name, "max_steps=3", "rollout.max_staleness=0"), local=local)
        try:
            runs[name] = (
                [d.step(s)[0] for s in (1, 2, 3)],
                {k: v.clone() for k, v in d.p.model.state_dict().items()},
            )
        finally:
            d.close()
    (ms, ws), (ma, wa) = runs["sync"], runs["async"]
    assert_same_steps(ms, ma)
    assert any(m["trained_seqs"] > 0 and m["loss"] != 0 for m in ms)  # the updates were real
    assert all(torch.equal(ws[k], wa[k]) for k in ws)


def test_partial_rollout_equals_one_shot():
    """With frozen weights, 3 iterations of 4 tokens give the tokens and log-probs of one
    iteration of 12 (per-sequence seeded sampling, re-prefill between iterations)."""
    cfg = build_config(None, TINY + ["rollout.max_new_tokens=12", "rollout.partial_max_iters=8"])
    w = RolloutWorker(cfg, 0)
    state = w.engine.model.state_dict()
    w.load_weights(0, state, state_checksum(state))
    prompts = [
        w.tok("a b", add_special_tokens=False).input_ids,
        w.tok("hello there", add_special_tokens=False).input_ids,
    ]

    def jobs():
        return [
            GroupJob(
                uid=g,
                rendered=("", ""),
                example=None,
                seqs=[Seq(uid=2 * g + k, prompt_ids=p) for k in range(2)],
            )
            for g, p in enumerate(prompts)
        ]

    w._score = lambda jobs: None  # the rewards are not under test
    one = w.rollout(jobs(), 0, 12)[0]
    part = jobs()
    for _ in range(3):
        part = w.rollout(part, 0, 4)[0]
    for a, b in zip([s for j in one for s in j.seqs], [s for j in part for s in j.seqs]):
        assert a.tokens == b.tokens and len(a.tokens) > 0
        assert torch.allclose(torch.tensor(a.logps), torch.tensor(b.logps), atol=1e-5)
        assert b.iters == (3 if len(b.tokens) > 8 else b.iters) and a.iters == 1
    assert [s.tokens for j in one for s in j.seqs][0] != [s.tokens for j in one for s in j.seqs][1]


def test_weight_sync_fails_loudly(tmp_path):
    from thinkrl.models import load_model

    cfg = cfg_of(tmp_path, "ray.sync_timeout_s=60", "ray.rollout_timeout_s=2")
    pool = RayPool(cfg)
    try:
        w0 = pool.actors[0]
        state = load_model("tiny-random")[0].state_dict()
        good = state_checksum(state)
        # weights corrupted on the way: the worker's own digest disagrees with the learner's
        with pytest.raises(
            WeightSyncError, match="arrived with checksum .* but the learner sent 0+; they were corrupted"
        ):
            pool._get({0: w0.load_weights.remote(1, state, "0" * 32)}, 60, "load")
        # a worker asked to sample with a version it does not hold
        job = GroupJob(uid=0, rendered=("", ""), example=None, seqs=[Seq(uid=0, prompt_ids=[1, 2])])
        with pytest.raises(
            WeightSyncError, match="holds policy version None but was asked to sample with version 3"
        ):
            pool.wait(pool.submit([job], 3, 4))
        # a rollout that does not return in time stops the next sync with one message, not a hang
        pool.sync(state, 3, good)
        ray.get(w0.set_delay.remote(30), timeout=60)
        pool.submit([job], 3, 4)
        with pytest.raises(WeightSyncError, match="did not return within ray.rollout_timeout_s=2 s"):
            pool.sync(state, 4, good)
    finally:
        pool.close()


@pytest.mark.parametrize("restarts", [1, 0])
def test_killed_worker_drops_its_groups(tmp_path, restarts):
    d = Driver(cfg_of(tmp_path, "max_steps=3", f"ray.max_restarts={restarts}"))
    try:
        assert d.step(1)[0]["dropped_seqs"] == 0
        pid = d.pool.pids()[0]
        ray.get(d.pool.actors[0].set_delay.remote(5), timeout=60)
        threading.Timer(2.0, os.kill, (pid, signal.SIGKILL)).start()  # kill -9 mid-rollout
        m2, _ = d.step(2)
        assert m2["dropped_seqs"] == 2  # worker 0 held one group of G=2
        assert m2["trained_seqs"] == 2 and m2["generated_seqs"] == 2
        # restarted by Ray and reloaded by the sync after step 2, or dropped: the survivor runs both groups
        m3, _ = d.step(3)
        assert m3["dropped_seqs"] == 0 and m3["generated_seqs"] == 4
        assert m3["rollout_workers"] == 1 + restarts
        if restarts:
            assert d.pool.pids()[0] != pid
    finally:
        d.close()


def test_unschedulable_workers_fail_with_one_message(tmp_path, capsys):
    # 3 workers of 1 CPU on a 2-CPU cluster: the third never starts; the run says so and stops
    rc = main(
        [
            "train",
            *TINY,
            f"output_dir={tmp_path}",
            "max_steps=1",
            "distributed.rollout_workers=3",
            "ray.sync_timeout_s=10",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert re.search(
        r"^thinkrl: error: rollout worker \d did not start and load the model within 10 s \(does the "
        r"cluster have the 3 x ray.cpus_per_worker=1 it needs\?\)",
        err,
        re.M,
    ), err[-2000:]
    deadline = time.monotonic() + 30  # every actor of the failed run was killed: its CPUs come back
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == 2


def test_a_reward_model_scores_in_the_rollout_workers(tmp_path):
    """rewards={rm: 1.0}: each worker actor loads the reward model beside its engine and scores
    its groups there. Its scores equal the same model's in this process for the same texts, and
    they tell the completions apart (a constant would pass a weaker check)."""
    from thinkrl.rewards import RewardModel
    from thinkrl.trainer.rm import RMConfig, train_rm

    rows = [{"prompt": f"question {i}?", "chosen": "yes yes", "rejected": "no no"} for i in range(16)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    final = train_rm(
        RMConfig(
            model="tiny-random",
            data=str(tmp_path / "pairs.jsonl"),
            output_dir=str(tmp_path / "rm"),
            batch_size=8,
            dtype="fp32",
            progress=False,
        )
    )
    d = Driver(cfg_of(tmp_path / "run", "max_steps=1", "rewards={rm: 1.0}", f"reward_args.rm.path={final}"))
    try:
        jobs, _, _ = d.batch(1)
    finally:
        d.close()
    here = RewardModel({"rm": 1.0}, {"rm": {"path": str(final)}})
    assert len(jobs) == 2
    for j in jobs:
        totals, parts = here.score(j.texts, [j.example] * len(j.texts), group_size=len(j.texts))
        assert j.parts["rm"] == pytest.approx(list(parts["rm"]), abs=1e-5)
        assert j.totals == pytest.approx(list(totals), abs=1e-5)
    got = [v for j in jobs for v in j.parts["rm"]]
    assert len({round(v, 6) for v in got}) == len(got)


def test_lora_workers_sample_with_the_merged_weights(tmp_path):
    """lora.enabled=true: each sync sends the learner's merged weights (base + scaled B·A), so
    after two updates every worker's model equals the merged policy, which is no longer the
    base; the same run on Ray actors finishes and saves the adapter."""
    from thinkrl.models import load_model
    from thinkrl.trainer.common import merged_copy

    d = Driver(cfg_of(tmp_path / "local", "max_steps=2", "lora.enabled=true"), local=True)
    try:
        for s in (1, 2):
            d.step(s)
        merged = merged_copy(d.p.model).state_dict()
        for w in d.pool.workers.values():
            got = w.engine.model.state_dict()
            assert w.version == 2 and got.keys() == merged.keys()
            assert all(torch.equal(got[k], merged[k]) for k in merged)
    finally:
        d.close()
    base = load_model("tiny-random")[0].state_dict()
    assert any(not torch.equal(base[k], merged[k]) for k in merged)
    rc = main(["train", *TINY, f"output_dir={tmp_path / 'ray'}", "max_steps=2", "lora.enabled=true"])
    assert rc == 0 and (tmp_path / "ray" / "final" / "adapter" / "adapter_config.json").is_file()


def test_resume_continues_exactly(tmp_path):
    """resume=true on Ray: a run resumed from its step-1 checkpoint redoes steps 2 and 3 with
    the metrics and the weights of the uninterrupted run (the checkpoint keeps the learner, the
    sampler and the sequence ids that seed the workers' sampling)."""
    import shutil

    from safetensors.torch import load_file

    args = ["train", *TINY, "max_steps=3", "save_every=1", "rollout.max_staleness=0"]
    assert main([*args, f"output_dir={tmp_path / 'full'}"]) == 0
    run = tmp_path / "resumed"
    shutil.copytree(tmp_path / "full", run)
    shutil.rmtree(run / "final")
    for name in ("step-2", "step-3"):
        shutil.rmtree(run / "checkpoints" / name, ignore_errors=True)
    (run / "checkpoints" / "latest").write_text("step-1\n")
    assert main([*args, f"output_dir={run}", "resume=true"]) == 0
    full = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == [1, 2, 3]
    assert_same_steps(full, again)
    assert full[2]["loss"] != full[1]["loss"]  # the steps differ, so the equality is not trivial
    wa, wb = (
        load_file(tmp_path / "full" / "final" / "model.safetensors"),
        load_file(run / "final" / "model.safetensors"),
    )
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _both_pools(cfgs, steps, exact: bool = True):
    """The same run through the in-process pool and through Ray actors (max_staleness=0):
    per-step metrics (timings left out) and final weights of each, equal bit for bit; with
    ``exact=False``, what depends on the engine's log-probs (and the training on them) within
    1e-5, the rest (rewards, lengths, counts: the samples) equal (see the caller), and the
    final weights within 1e-5 (1% of one AdamW step of lr 1e-3: where a gradient entry is near
    AdamW's eps, a last-bit difference in the loss moves that entry's update by up to ~1e-6;
    measured 8.4e-7 in a run of tests/distributed) while training moved them 100x further."""
    runs = {}
    for name, local in (("sync", True), ("async", False)):
        d = Driver(cfgs(name), local=local)
        try:
            runs[name] = (
                [d.step(s)[0] for s in range(1, steps + 1)],
                {k: v.clone() for k, v in d.p.model.state_dict().items()},
                d,
            )
        finally:
            d.close()
    (ms, ws, ds), (ma, wa, _) = runs["sync"], runs["async"]
    if exact:
        assert_same_steps(ms, ma)
        assert all(torch.equal(ws[k], wa[k]) for k in ws)
        return ms, ds
    for a, b in zip(ms, ma, strict=True):
        keep = compared(a)
        assert sorted(keep) == sorted(k for k in b if k in keep)
        for k in keep:
            if k.startswith(LOGP_DERIVED):
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k
            else:
                assert a[k] == b[k], k
    from thinkrl.models import load_model

    start = load_model("tiny-random")[0].state_dict()
    assert max((ws[k] - start[k]).abs().max().item() for k in ws) > 100 * 1e-5
    for k in ws:
        torch.testing.assert_close(ws[k], wa[k], rtol=0, atol=1e-5, msg=k)
    return ms, ds


def parity_reward(tmp_path) -> str:
    """A reward in a file (the worker actors load it by path): the parity of the completion's
    byte sum, 0 or 1, so a group of G=2 is all-equal half the time."""
    (tmp_path / "parity.py").write_text(
        "def parity(completion, example):\n    return float(sum(map(ord, completion)) % 2)\n"
    )
    return f"rewards={{{tmp_path / 'parity.py'}:parity: 1.0}}"


def test_dynamic_sampling_on_ray(tmp_path):
    """sampling.dynamic=true under Ray: groups whose rewards are all equal are seen but not
    trained on, and refill iterations ask for the missing groups only, until 2 are kept or 2
    refills ran. A parity reward makes half the groups of G=2 all-equal, so refills happen.
    The Ray run equals the in-process one step for step."""
    extra = [
        "max_steps=3",
        "rollout.max_staleness=0",
        "sampling.dynamic=true",
        "sampling.max_rounds=2",
        parity_reward(tmp_path),
        "algo.entropy_coef=0.0",
    ]
    ms, _ = _both_pools(lambda name: cfg_of(tmp_path / name, *extra), 3)
    for m in ms:
        assert 0 <= m["dynamic_rounds"] <= 2
        assert m["dynamic_kept_groups"] <= 2  # a refill asks only for what is missing
        assert m["dynamic_kept_groups"] == 2 or m["dynamic_rounds"] == 2  # full, or the cap was hit
        assert m["generated_seqs"] == 2 * m["dynamic_generated_groups"]
        assert m["trained_seqs"] == 2 * m["dynamic_kept_groups"]
    assert sum(m["dynamic_rounds"] for m in ms) > 0  # some step refilled: the test is not vacuous
    assert sum(m["dynamic_generated_groups"] - m["dynamic_kept_groups"] for m in ms) > 0


def test_gae_critic_on_ray(tmp_path):
    """algo.advantage=gae under Ray: the critic lives with the learner in the driver; the Ray
    run equals the in-process one, and the critic learns: its zero-initialised values get a
    loss from the parity rewards at step 1 and have moved by step 2."""
    extra = ["max_steps=2", "rollout.max_staleness=0", "algo.advantage=gae", "algo.loss=ppo_clip"]
    ms, d = _both_pools(lambda name: cfg_of(tmp_path / name, *extra, parity_reward(tmp_path)), 2)
    assert d.p.critic is not None
    assert ms[0]["value_mean"] == 0.0 and ms[0]["value_loss"] > 0
    assert ms[1]["value_mean"] != 0.0


def _session_pids(sid: int) -> list[int]:
    """The live processes of session ``sid`` (Linux /proc; empty elsewhere)."""
    out = []
    for d in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            if d.isdigit() and int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[3]) == sid:
                out.append(int(d))
        except (OSError, ValueError, IndexError):
            pass
    return out


def test_ctrl_c_stops_a_ray_run_at_a_step_and_it_resumes(tmp_path):
    """Ctrl-C in the terminal (SIGINT to the whole process group: the driver and the Ray
    cluster it started) stops the run after the current step, saves that step, exits 130 and
    leaves no Ray process behind; resume=true then continues from that step."""
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "thinkrl", "train", *TINY, f"output_dir={out}", "ray.num_cpus=2"]
    env = {**os.environ, "PYTHONPATH": worker_pythonpath()}
    p = subprocess.Popen(
        [*cmd, "max_steps=500"], start_new_session=True, stderr=subprocess.PIPE, text=True, env=env
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while p.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.2)
    assert p.poll() is None, "the run ended before its first step"
    os.killpg(p.pid, signal.SIGINT)
    try:
        err = p.communicate(timeout=120)[1]
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise AssertionError("the Ray run did not stop within 120 s of SIGINT") from None
    n = metrics.read_text().count("\n")
    assert p.returncode == 130
    assert err.strip().splitlines()[-1] == (
        f"thinkrl: interrupted: SIGINT during step {n}: saved checkpoints/step-{n}; continue with resume=true"
    )
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{n}"
    deadline = time.monotonic() + 30
    while _session_pids(p.pid) and time.monotonic() < deadline:  # raylet, GCS and workers shut down
        time.sleep(0.5)
    assert _session_pids(p.pid) == []
    done = subprocess.run(
        [*cmd, f"max_steps={n + 1}", "resume=true"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, n + 2))


def test_a_nan_reward_trains_nothing(tmp_path):
    """A reward that returns NaN would make its group's advantages NaN: the driver's step trains
    nothing and says why, as the single-process step does, and the weights stay as they were."""
    (tmp_path / "nan.py").write_text("def nan(completion, example):\n    return float('nan')\n")
    d = Driver(cfg_of(tmp_path, "max_steps=1", f"rewards={{{tmp_path / 'nan.py'}:nan: 1.0}}"), local=True)
    try:
        before = {k: v.clone() for k, v in d.p.model.state_dict().items()}
        m, _ = d.step(1)
        assert m["skip_cause"] == "nan_reward" and m["trained_seqs"] == 0 and m["generated_seqs"] == 4
        assert all(torch.equal(before[k], v) for k, v in d.p.model.state_dict().items())
    finally:
        d.close()


CHATTER = Path(__file__).with_name("chatter_env.py")  # copied to tmp_path by the tests


@pytest.mark.parametrize("decoder", ["reprefill", "cache"])
def test_multi_turn_episodes_run_in_the_rollout_workers(tmp_path, monkeypatch, decoder):
    """env.name=<a multi-turn env> on Ray: each worker runs its groups' episodes whole (tool
    steps in the worker) from a seed of the group's uid; the Ray run equals the in-process pool
    step for step, and its batches carry the episodes' observations and loss masks.

    With the re-prefill decoder every turn is one seeded call, so the runs are equal bit for
    bit. The cache decoder samples each episode from its own stream, so the tokens are equal,
    but a tool step that returns joins the decode batch at whichever step is running then: the
    rows a log-prob shares depend on timing, and so do its last float bits (and the loss's)."""
    from thinkrl.envs import ENVS

    monkeypatch.setattr(ENVS, "_items", dict(ENVS._items))  # the plugin's env is gone after the test
    monkeypatch.setattr(ENVS, "_traits", dict(ENVS._traits))
    shutil.copy(CHATTER, tmp_path / "chatter.py")
    extra = [
        "max_steps=2",
        "rollout.max_staleness=0",
        "rollout.max_new_tokens=24",
        f"plugins=[{tmp_path / 'chatter.py'}]",
        "env.name=chatter",
        "env.max_turns=3",
        f"env.decoder={decoder}",
        parity_reward(tmp_path),
    ]
    ms, d = _both_pools(lambda name: cfg_of(tmp_path / name, *extra), 2, exact=decoder == "reprefill")
    assert all(m["tool/calls_per_episode"] > 0 for m in ms)
    d = Driver(cfg_of(tmp_path / "batch", *extra), local=True)
    try:
        jobs, _, _ = d.batch(1)
    finally:
        d.close()
    g = to_groups(jobs)
    roles = [[t["role"] for t in e["turns"]] for e in g.ro.episodes]
    assert ["assistant", "tool", "assistant"] in roles
    for ep, mask, ids in zip(g.ro.episodes, g.ro.loss_mask, g.ro.completion_ids):
        assert len(mask) == len(ids) and sum(mask) == ep["policy_tokens"]
        assert len(mask) - sum(mask) == ep["env_tokens"]  # observation tokens are never trained on


def test_collective_weight_sync_equals_the_object_store(tmp_path):
    """ray.weight_sync=collective: the weights go to the workers as a gloo broadcast in a group
    of their own (the default process group stays uninitialised); the run equals the
    object-store run step for step, and each worker received the whole model at every sync
    (the initial one and one per step), so the broadcast really carried them."""
    import torch.distributed as dist

    extra = ["max_steps=2", "rollout.max_staleness=0"]
    runs = {}
    for mode in ("object_store", "collective"):
        d = Driver(cfg_of(tmp_path / mode, *extra, f"ray.weight_sync={mode}"))
        try:
            ms = [d.step(s)[0] for s in (1, 2)]
            got = ray.get([a.received.remote() for a in d.pool.actors.values()], timeout=60)
            runs[mode] = (ms, {k: v.clone() for k, v in d.p.model.state_dict().items()}, got)
            assert (d.pool.group is not None) == (mode == "collective")
            assert not dist.is_initialized()
            nbytes = sum(v.numel() * v.element_size() for v in d.p.model.state_dict().values())
        finally:
            d.close()
    (m0, w0, got0), (m1, w1, got1) = runs["object_store"], runs["collective"]
    assert_same_steps(m0, m1)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert got0 == [0, 0] and got1 == [3 * nbytes] * 2


def test_collective_weight_sync_fails_loudly(tmp_path):
    """A corrupted broadcast is refused with the object store's message; a worker killed
    (kill -9) stops the run at the next sync with one message, not a hang."""
    from thinkrl.models import load_model

    cfg = cfg_of(tmp_path, "ray.weight_sync=collective", "ray.sync_timeout_s=30", "ray.max_restarts=0")
    pool = RayPool(cfg)
    try:
        state = load_model("tiny-random")[0].state_dict()
        good = state_checksum(state)
        pool.sync(state, 1, good)
        with pytest.raises(
            WeightSyncError, match="arrived with checksum .* but the learner sent 0+; they were corrupted"
        ):
            pool.sync(state, 2, "0" * 32)
        os.kill(pool.pids()[1], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WeightSyncError, match="rollout worker 1 died .*weight_sync=collective"):
            pool.sync(state, 3, good)
        assert time.monotonic() - t0 < 30
    finally:
        pool.close()
