"""The openai backend against a real local server process, and the vLLM glue against vLLM's
documented interfaces (vLLM itself is not installed: docs/distributed-ray.md)."""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from thinkrl.config import ConfigError, build_config
from thinkrl.distributed.ray_engine import Seq
from thinkrl.distributed.ray_vllm import sampled_logprobs, vllm_sampling_kwargs, vllm_weights
from thinkrl.distributed.ray_worker import GroupJob, RolloutWorker, WeightSyncError, state_checksum
from thinkrl.rollout import SamplingParams

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    portfile = tmp_path_factory.mktemp("stub") / "port"
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "openai_stub.py"), str(portfile)], env=dict(os.environ)
    )
    try:
        deadline = time.monotonic() + 120
        while not (portfile.exists() and portfile.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "the stub server did not start"
            time.sleep(0.2)
        yield f"http://127.0.0.1:{portfile.read_text()}/v1"
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_openai_backend_against_a_server(server):
    cfg = build_config(
        None,
        [
            "model=tiny-random",
            "dtype=fp32",
            "distributed.backend=ray",
            "rollout.backend=openai",
            f"rollout.server_url={server}",
            "rollout.max_new_tokens=10",
            "rollout.group_size=2",
            "rollout.temperature=1.0",
        ],
    )
    w = RolloutWorker(cfg, 0)
    state = w.engine.model.state_dict()
    w.load_weights(0, state, state_checksum(state))
    w._score = lambda jobs: None
    ids = w.tok("a b", add_special_tokens=False).input_ids
    jobs = [
        GroupJob(uid=0, rendered=("", ""), example=None, seqs=[Seq(uid=k, prompt_ids=ids) for k in range(2)])
    ]
    for _ in range(2):  # two partial iterations of 5 tokens
        jobs = w.rollout(jobs, 0, 5)[0]
    for s in jobs[0].seqs:
        assert len(s.tokens) == len(s.logps) == len(s.versions) and 0 < len(s.tokens) <= 10
        assert all(lp <= 0 for lp in s.logps) and s.done
    got = json.loads(urllib.request.urlopen(server.rsplit("/v1", 1)[0] + "/", timeout=30).read())
    reqs = got["requests"]
    assert all(r["logprobs"] == 1 and r["n"] == 1 and r["temperature"] == 1.0 for r in reqs)
    assert len({r["seed"] for r in reqs}) == len(reqs)  # per sequence and iteration
    # a weight sync writes the weights and the server confirms the new version
    new = {k: v + 0.01 for k, v in state.items()}
    assert w.load_weights(1, new, state_checksum(new))["version"] == 1
    assert (
        json.loads(urllib.request.urlopen(server.rsplit("/v1", 1)[0] + "/", timeout=30).read())["version"]
        == 1
    )


def test_openai_backend_without_reload_fails_loudly():
    cfg = build_config(
        None,
        [
            "model=tiny-random",
            "distributed.backend=ray",
            "rollout.backend=openai",
            "rollout.server_url=http://127.0.0.1:9/v1",
            "ray.rollout_timeout_s=5",
        ],
    )
    w = RolloutWorker(cfg, 0)
    state = w.engine.model.state_dict()
    with pytest.raises(WeightSyncError, match="could not take the weights of policy version 1"):
        w.load_weights(1, state, state_checksum(state))


def test_config_errors():
    with pytest.raises(ConfigError, match="needs rollout.server_url"):
        build_config(None, ["distributed.backend=ray", "rollout.backend=openai"])
    with pytest.raises(ConfigError, match="rollout.max_staleness=1 needs distributed.backend=ray"):
        build_config(None, ["rollout.max_staleness=1"])
    with pytest.raises(ConfigError, match="distributed.backend 'mpi' unknown"):
        build_config(None, ["distributed.backend=mpi"])
    with pytest.raises(ConfigError, match="rollout.backend=vllm runs in rollout workers"):
        build_config(None, ["rollout.backend=vllm"])
    # an episode runs whole in one iteration, on an in-process engine
    with pytest.raises(ConfigError, match=r"env.name=python \(multi-turn episodes\) on Ray needs rollout"):
        build_config(None, ["distributed.backend=ray", "env.name=python", "rollout.partial_tokens=8"])


def test_vllm_weight_names():
    # what vLLM's Llama load_weights takes: HF names (it stacks q/k/v itself); no tied lm_head
    t = torch.zeros(1)
    state = {
        "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight": t,
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight": t,
        "model.layers.0.self_attn.rotary_emb.inv_freq": t,
        "model.embed_tokens.weight": t,
        "lm_head.weight": t,
    }
    assert [n for n, _ in vllm_weights(state, tie_word_embeddings=True)] == [
        "model.layers.0.self_attn.q_proj.weight",
        "model.embed_tokens.weight",
    ]
    assert "lm_head.weight" in dict(vllm_weights(state, tie_word_embeddings=False))


def test_vllm_sampling_params():
    kw = vllm_sampling_kwargs(SamplingParams(max_new_tokens=64, temperature=0.8, top_p=0.9, top_k=0), 8, 123)
    assert kw == {
        "n": 1,
        "max_tokens": 8,
        "temperature": 0.8,
        "top_p": 0.9,
        "top_k": 0,
        "min_tokens": 0,
        "seed": 123,
        "logprobs": 0,
    }


def test_vllm_logprob_extraction():
    # CompletionOutput.logprobs: per generated token, {token_id: Logprob(logprob, rank, decoded_token)}
    Logprob = SimpleNamespace
    out = SimpleNamespace(
        token_ids=[5, 9],
        logprobs=[
            {5: Logprob(logprob=-0.5, rank=1), 7: Logprob(logprob=-1.0, rank=2)},
            {9: Logprob(logprob=-2.25, rank=3)},
        ],
    )
    assert sampled_logprobs(out) == ([5, 9], [-0.5, -2.25])
    with pytest.raises(ValueError, match="no log-prob per sampled token"):
        sampled_logprobs(SimpleNamespace(token_ids=[5], logprobs=None))


def test_packed_weights_travel_out_of_band_and_unpack_bit_for_bit():
    """pack_state: numpy arrays, which pickle protocol 5 (Ray's) hands over as out-of-band
    buffers, so the pickled stream itself holds no tensor bytes; bf16 goes as its int16 bits.
    Unpacked, every tensor is the original, dtype and bits, and the digest is the same."""
    import pickle

    from thinkrl.distributed.ray_worker import is_packed, pack_state, unpack_state

    g = torch.Generator().manual_seed(0)
    state = {
        "w": torch.randn(64, 32, generator=g),
        "b": torch.randn(32, generator=g).bfloat16(),
        "steps": torch.arange(5),
        "t": torch.randn(8, 4, generator=g)[:, :2],  # not contiguous
    }
    packed = pack_state(state)
    assert is_packed(packed) and not is_packed(state)
    buffers = []
    stream = pickle.dumps(packed, protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == 4 and len(stream) < 1000  # 8 KiB of fp32 alone in the tensors
    back = unpack_state(pickle.loads(stream, buffers=buffers))
    assert back.keys() == state.keys()
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    assert state_checksum(back) == state_checksum(state)
    # and a worker takes them as it takes tensors
    cfg = build_config(None, ["model=tiny-random", "distributed.backend=ray", "dtype=fp32"])
    w = RolloutWorker(cfg, 0)
    sd = {k: v.clone() for k, v in w.engine.model.state_dict().items()}
    sd = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    assert w.load_weights(3, pack_state(sd), state_checksum(sd))["version"] == 3
    got = w.engine.model.state_dict()
    assert all(torch.equal(got[k], sd[k]) for k in sd)
