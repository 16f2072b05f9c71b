"""thinkrl on a CUDA GPU: the same results as on the CPU (fp32), and a training run.

Every test here is marked ``cuda`` and skipped, with the reason, where torch sees no GPU
(every CI machine of this project); ``scripts/gpu_check.sh`` runs them on a GPU machine."""

import copy
import json

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible to torch"),
]

PROMPTS = ["What is 2 + 3?", "Name a colour.", "Tell me a story about a cat"]


@pytest.fixture
def lively(tiny_pair, shake):
    model, tok = tiny_pair
    model = copy.deepcopy(model)
    return shake(model), tok


def ids_of(tok):
    return [
        tok(
            tok.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            ),
            add_special_tokens=False,
        ).input_ids
        for q in PROMPTS
    ]


def test_auto_is_the_gpu_and_bf16_follows_it():
    from thinkrl import device

    assert device.resolve_device("auto") == "cuda:0"
    assert device.use_bf16("auto", "cuda:0") == torch.cuda.is_bf16_supported()
    assert device.train_attention("cuda:0") == "sdpa"


@pytest.mark.parametrize("backend", ["hf", "fast"])  # fast hands over to hf on CUDA
def test_cuda_rollouts_equal_cpu_rollouts_in_fp32(lively, backend):
    from thinkrl.rollout import SamplingParams, build_engine

    model, tok = lively
    ids = ids_of(tok)
    greedy = SamplingParams(max_new_tokens=16, temperature=0)
    cpu = build_engine("hf", model, tok, batch_size=8, bf16=False).generate(ids, 1, greedy)
    gpu_model = copy.deepcopy(model).to("cuda:0")
    eng = build_engine(backend, gpu_model, tok, batch_size=8, bf16=False, device="cuda:0")
    got = eng.generate(ids, 1, greedy)
    assert got.completion_ids == cpu.completion_ids and got.truncated == cpu.truncated
    for a, b in zip(got.logps, cpu.logps):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-3, rtol=0)
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, seed=4)
    assert eng.generate(ids, 2, sampled).completion_ids == eng.generate(ids, 2, sampled).completion_ids


@pytest.mark.parametrize("grouped", [False, True])
def test_token_logps_and_gradients_on_cuda_equal_the_cpu(lively, grouped):
    from thinkrl.trainer.batch import make_grouped_micro_batch, make_micro_batch, token_logps

    model, tok = lively
    ids = ids_of(tok)[:2]
    comps = [[50, 51, 258], [52], [50, 32, 50, 258], [55, 56]]
    if grouped:
        mb = make_grouped_micro_batch(ids, comps, [0, 1, 2, 3], 2, tok.pad_token_id)
    else:
        mb = make_micro_batch([ids[0], ids[0], ids[1], ids[1]], comps, [0, 1, 2, 3], tok.pad_token_id)
    cpu_model, gpu_model = copy.deepcopy(model), copy.deepcopy(model).to("cuda:0")
    want, _ = token_logps(cpu_model, mb)
    got, _ = token_logps(gpu_model, mb)  # the micro-batch moves to the model's device
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=0)
    want.sum().backward()
    got.sum().backward()
    g_cpu = cpu_model.model.layers[0].mlp.down_proj.weight.grad
    g_gpu = gpu_model.model.layers[0].mlp.down_proj.weight.grad.cpu()
    torch.testing.assert_close(g_gpu, g_cpu, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["algo.kl_coef=0.05", "algo.kl_in=loss"],
        ["algo.advantage=gae", "algo.kl_coef=0.05", "algo.num_iterations=2"],
    ],
)
def test_training_runs_on_cuda_and_saves_a_cpu_loadable_model(tmp_path, extra):
    from transformers import AutoModelForCausalLM

    from thinkrl.cli import main

    data = tmp_path / "sums.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(20))
    )
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "model=tiny-random",
                f"task.name={data}",
                "device=cuda",
                "max_steps=2",
                f"output_dir={out}",
                "rollout.max_new_tokens=8",
                "rollout.prompts_per_step=2",
                "rollout.group_size=2",
                "eval.n=2",
                "progress=false",
                "plot=false",
                "task.template=plain",
                *extra,
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
    AutoModelForCausalLM.from_pretrained(out / "final")  # onto the CPU


QUESTIONS = ["1 + 1", "0 + 2", "2 + 0", "3 - 1"]
SHORT, LONG = "<think> 2 </think> <answer> 2 </answer>", "<think> so it is 2 </think> <answer> 2 </answer>"


@pytest.mark.parametrize("command", ["sft", "dpo", "rm"])
def test_supervised_trainers_on_cuda_match_the_cpu_in_fp32(tmp_path, command):
    """Two steps on each device from the same start: the same losses, to fp32 tolerance."""
    from thinkrl.cli import main

    rows = (
        [{"prompt": q, "completion": SHORT} for q in QUESTIONS]
        if command == "sft"
        else [{"prompt": q, "chosen": SHORT, "rejected": LONG} for q in QUESTIONS]
    )
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    losses = {}
    for dev in ("cpu", "cuda"):
        out = tmp_path / dev
        assert (
            main(
                [
                    command,
                    "model=tiny-random",
                    f"data={data}",
                    f"device={dev}",
                    "dtype=fp32",
                    "max_steps=2",
                    "batch_size=2",
                    "lr=0.001",
                    "progress=false",
                    "task.template=plain",
                    f"output_dir={out}",
                ]
            )
            == 0
        )
        losses[dev] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    torch.testing.assert_close(
        torch.tensor(losses["cuda"]), torch.tensor(losses["cpu"]), atol=1e-4, rtol=1e-4
    )


def test_a_cuda_run_resumes_on_the_cpu(tmp_path):
    """Checkpoints hold CPU tensors only where it matters: the trainer state loads anywhere."""
    from thinkrl.cli import main

    data = tmp_path / "sums.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"What is {i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(20))
    )
    out = tmp_path / "run"
    common = [
        "train",
        "model=tiny-random",
        f"task.name={data}",
        f"output_dir={out}",
        "rollout.max_new_tokens=8",
        "rollout.prompts_per_step=2",
        "rollout.group_size=2",
        "eval.before=false",
        "eval.after=false",
        "progress=false",
        "plot=false",
        "task.template=plain",
        "save_every=1",
        "keep_checkpoints=0",
        "dtype=fp32",
    ]
    assert main([*common, "device=cuda", "max_steps=2"]) == 0
    assert main([*common, "device=cpu", "max_steps=3", "resume=true"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
