"""The sft/sample/dpo/merge/pipeline commands end to end on tiny-random, plus the endpoint teacher."""

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from thinkrl.cli import main

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = ["1 + 1", "0 + 2", "2 + 0", "3 - 1", "4 - 2", "5 - 3", "6 - 4", "7 - 5"]
SHORT, LONG, WRONG = (
    "<think> 2 </think> <answer> 2 </answer>",
    "<think> so it is 2 </think> <answer> 2 </answer>",
    "<think> hm </think> <answer> 3 </answer>",
)
TASK = ["task.template=plain", "task.eval_size=3", "dtype=fp32"]


def rows(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def write(path, items):
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in items))
    return Path(path)


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    """tiny-random SFT-trained (by `thinkrl sft`) to answer "2" in three styles: short, long, wrong."""
    d = tmp_path_factory.mktemp("taught")
    task = write(d / "task.jsonl", [{"question": q, "answer": "2"} for q in QUESTIONS])
    data = write(
        d / "sft.jsonl",
        [{"prompt": q, "completion": c} for q in QUESTIONS for c in (SHORT, SHORT, LONG, WRONG)],
    )
    assert (
        main(
            [
                "sft",
                "model=tiny-random",
                f"data={data}",
                f"output_dir={d / 'sft'}",
                "lr=0.01",
                "max_steps=60",
                "batch_size=8",
                "progress=false",
                *TASK,
            ]
        )
        == 0
    )
    return {
        "dir": d,
        "task": task,
        "model": d / "sft" / "final",
        "metrics": rows(d / "sft" / "metrics.jsonl"),
    }


def test_sft_learns_and_writes_an_hf_folder(taught):
    from transformers import AutoModelForCausalLM

    first, last = taught["metrics"][0], taught["metrics"][-1]
    assert len(taught["metrics"]) == 60
    assert last["ce"] < 0.2 * first["ce"]
    assert AutoModelForCausalLM.from_pretrained(taught["model"]).config.vocab_size == 259


def test_sample_keeps_verified_shortest_and_pairs(taught):
    d = taught["dir"]
    common = [
        f"model={taught['model']}",
        f"task.name={taught['task']}",
        "n=6",
        "prompts=6",
        "max_new_tokens=48",
        "temperature=0.5",
        "require_format=false",
        *TASK,
    ]  # the 60-step model's tags are often misspelt
    assert main(["sample", *common, "mode=shortest", f"output={d / 'short.jsonl'}"]) == 0
    short = rows(d / "short.jsonl")
    stats = json.loads((d / "short.stats.json").read_text())
    assert stats["samples"] == 36 and 0 < len(short) <= 6
    for r in short:  # prompt/completion rows for the plain template; every kept answer verified
        assert "<answer> 2 </answer>" in r["completion"] and r["prompt"] in QUESTIONS
    assert main(["sample", *common, "mode=pairs", f"output={d / 'pairs.jsonl'}"]) == 0
    for r in rows(d / "pairs.jsonl"):
        assert "<answer> 2 </answer>" in r["chosen"]
        assert r["rejected_tokens"] > r["chosen_tokens"] or "<answer> 2 </answer>" not in r["rejected"]
    # One pass for both: the pairs written alongside the shortest rows equal a separate pairs run.
    assert (
        main(
            [
                "sample",
                *common,
                "mode=shortest",
                f"output={d / 'both.jsonl'}",
                f"pairs_output={d / 'both_pairs.jsonl'}",
            ]
        )
        == 0
    )
    assert rows(d / "both.jsonl") == short and rows(d / "both_pairs.jsonl") == rows(d / "pairs.jsonl")


def test_readability_filters():
    from thinkrl.pipeline.sample import Sample, SampleConfig, foreign_script_share, judge

    assert foreign_script_share("the sum is 15") == 0.0
    assert foreign_script_share("abc дд") == pytest.approx(2 / 5)  # 3 Latin, 2 Cyrillic letters
    s = [
        Sample(SHORT, 9, True, ""),
        Sample(SHORT + " ", 9, True, ""),
        Sample("<think> два </think> <answer> 2 </answer>", 9, True, ""),
        Sample(SHORT, 90, True, ""),
        Sample(WRONG, 5, False, ""),
    ]
    judge(s, [1, 1, 1, 1, 1], [False] * 5, SampleConfig(max_tokens=50))
    assert [x.reason for x in s] == ["kept", "duplicate", "mixed_script", "length", "wrong"]


def test_dpo_starts_at_log2_and_simpo_needs_no_reference(taught, monkeypatch, tmp_path):
    data = write(tmp_path / "p.jsonl", [{"prompt": "1 + 1", "chosen": SHORT, "rejected": LONG}])
    base = [
        "dpo",
        f"model={taught['model']}",
        f"data={data}",
        "batch_size=1",
        "max_steps=2",
        "lr=0.001",
        "progress=false",
        *TASK,
    ]
    assert main([*base, f"output_dir={tmp_path / 'dpo'}"]) == 0
    m = rows(tmp_path / "dpo" / "metrics.jsonl")
    assert abs(m[0]["loss"] - math.log(2)) < 1e-5  # step 1: policy == reference
    assert m[1]["reward_margin"] > 0  # after one step the chosen response gained on the rejected one
    import thinkrl.trainer.dpo as dpo_mod

    def no_reference(*a, **k):
        raise AssertionError("SimPO computed reference log-probs")

    monkeypatch.setattr(dpo_mod, "reference_logps", no_reference)
    assert main([*base, "loss=simpo", "beta=2.0", f"output_dir={tmp_path / 'simpo'}"]) == 0
    assert (tmp_path / "simpo" / "final" / "model.safetensors").is_file()


def test_merge_with_weights_1_0_returns_the_first_model(taught, tmp_path):
    assert (
        main(["merge", f"models={taught['model']},tiny-random", "weights=1,0", f"output_dir={tmp_path}"]) == 0
    )
    merged, first = (
        load_file(tmp_path / "final" / "model.safetensors"),
        load_file(taught["model"] / "model.safetensors"),
    )
    assert merged.keys() == first.keys() and all(torch.equal(merged[k], first[k]) for k in first)
    assert main(["merge", f"models={taught['model']},tiny-random", f"output_dir={tmp_path / 'half'}"]) == 0
    half = load_file(tmp_path / "half" / "final" / "model.safetensors")
    from thinkrl.models import resolve

    rand = load_file(Path(resolve("tiny-random")) / "model.safetensors")
    k = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(half[k], (first[k] + rand[k]) / 2, atol=1e-7)


class _Teacher(BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Teacher.seen.append(body)
        q = body["messages"][-1]["content"]
        good = {"message": {"role": "assistant", "reasoning_content": f"{q} gives two", "content": "2"}}
        bad = {
            "message": {"role": "assistant", "reasoning_content": "guess", "content": "<answer> 5 </answer>"}
        }
        out = json.dumps({"choices": [good, bad][: body["n"]]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *a):
        pass


def test_distillation_from_an_endpoint_teacher(taught, tmp_path):
    server = HTTPServer(("127.0.0.1", 0), _Teacher)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        assert (
            main(
                [
                    "sample",
                    "model=tiny-random",
                    f"task.name={taught['task']}",
                    "n=2",
                    "prompts=3",
                    "mode=all",
                    "per_prompt=0",
                    f"endpoint.base_url={url}",
                    "endpoint.model=teacher",
                    "task.template=chat",
                    f"output={tmp_path / 'traces.jsonl'}",
                    "task.eval_size=3",
                ]
            )
            == 0
        )
    finally:
        server.shutdown()
    got = rows(tmp_path / "traces.jsonl")
    assert len(got) == 3 and len(_Teacher.seen) == 3 and _Teacher.seen[0]["model"] == "teacher"
    q = got[0]["messages"][-2]["content"]
    assert got[0]["messages"][-1] == {
        "role": "assistant",
        "content": f"<think> {q} gives two </think> <answer> 2 </answer>",
    }
    # the student trains on the verified traces, with token-level KL to a same-vocabulary teacher
    assert (
        main(
            [
                "sft",
                "model=tiny-random",
                f"data={tmp_path / 'traces.jsonl'}",
                f"output_dir={tmp_path / 's'}",
                "max_steps=2",
                "batch_size=3",
                f"kd_teacher={taught['model']}",
                "progress=false",
                "dtype=fp32",
            ]
        )
        == 0
    )
    m = rows(tmp_path / "s" / "metrics.jsonl")
    assert len(m) == 2 and m[0]["kd_kl"] > 0


def test_unreachable_endpoint_is_one_line(taught, tmp_path, capsys):
    rc = main(
        [
            "sample",
            "model=tiny-random",
            f"task.name={taught['task']}",
            "endpoint.base_url=http://127.0.0.1:9/v1",
            "endpoint.model=x",
            f"output={tmp_path / 'x.jsonl'}",
            "task.eval_size=3",
            "endpoint.timeout=2",
        ]
    )
    err = errors(capsys)
    assert (
        rc == 2
        and len(err) == 1
        and err[0].startswith("thinkrl: error: could not reach the teacher endpoint")
    )


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda d: ["sft", "model=tiny-random", f"data={d / 'none.jsonl'}"], "data file not found"),
        (
            lambda d: [
                "sft",
                "model=tiny-random",
                f"data={write(d / 'b.jsonl', [{'prompt': 'a', 'completion': 'b'}])}",
                "lora.enabled=true",
                "lora.target_modules=[nope]",
                f"output_dir={d}/o",
            ],
            "lora.target_modules ['nope']",
        ),
        (lambda d: ["dpo", "model=tiny-random", f"data={d / 'bad.jsonl'}"], "bad.jsonl:2: not valid JSON"),
        (lambda d: ["dpo", "model=tiny-random", "data=x.jsonl", "loss=ipo"], "unknown preference loss 'ipo'"),
        (lambda d: ["merge", "models=tiny-random"], "merge needs models=[A,B,...]"),
        (
            lambda d: ["pipeline", str(write_yaml(d, [{"name": "a", "kind": "grpo"}]))],
            "unknown stage kind 'grpo'",
        ),
        (
            lambda d: ["pipeline", str(write_yaml(d, [{"name": "a", "kind": "sft", "lr": "x"}]))],
            "stage 'a' (sft): lr: expected a number",
        ),
        (lambda d: ["pipeline", str(d / "missing.yaml")], "config file not found"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, make, message):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{oops\n')
    rc = main(make(tmp_path))
    err = errors(capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("thinkrl: error:"), err
    assert message in err[0]


def errors(capsys) -> list[str]:
    """stderr without transformers' weight-loading progress bars; never a traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [x for x in err.strip().splitlines() if not x.startswith("Loading weights")]


def write_yaml(d, stages):
    p = d / "p.yaml"
    p.write_text(yaml.safe_dump({"model": "tiny-random", "stages": stages}))
    return p


TINY = {
    "sample": {"n": 6, "prompts": 6, "max_new_tokens": 48, "temperature": 0.5, "require_format": False},
    "sft": {"max_steps": 2, "batch_size": 4, "lr": 1e-4, "progress": False},
    "dpo": {"max_steps": 1, "batch_size": 2, "progress": False},
    "rm": {"max_steps": 1, "batch_size": 2, "progress": False, "eval_fraction": 0.0},
    "rl": {
        "max_steps": 1,
        "save_every": 0,
        "plot": False,
        "progress": False,
        "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 48},
    },
}


@pytest.mark.parametrize("recipe", ["r1_zero", "r1", "long2short", "qwen3_fusion"])
def test_shipped_recipe_runs_tiny_and_resumes(recipe, taught, tmp_path, capsys):
    cfg = yaml.safe_load((ROOT / "configs" / "pipelines" / f"{recipe}.yaml").read_text())
    cfg.update(
        model=str(taught["model"]),
        output_dir=str(tmp_path / "run"),
        eval_n=3,
        eval_max_new_tokens=48,
        dtype="fp32",
        task={**cfg.get("task", {}), "name": str(taught["task"]), "template": "plain", "eval_size": 3},
    )
    for st in cfg["stages"]:
        for k, v in TINY.get(st["kind"], {}).items():
            st[k] = {**st.get(k, {}), **v} if isinstance(v, dict) else v
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["pipeline", str(path)]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [r["stage"] for r in report] == ["base"] + [
        s["name"] for s in cfg["stages"] if s["kind"] not in ("sample", "traces", "rm")
    ]
    assert all(0 <= r["accuracy"] <= 1 and r["response_len_mean"] > 0 for r in report)
    if recipe == "qwen3_fusion":  # every held-out question in both modes, first thinking
        assert all(
            sorted(r["by_mode"]) == ["off", "on"]
            and r["by_mode"]["on"]["n"] == r["by_mode"]["off"]["n"] == r["n"] // 2
            for r in report
        )
    out = capsys.readouterr().out
    assert "accuracy" in out and "response_len_mean" in out
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("*/stage.json")}
    assert main(["pipeline", str(path)]) == 0  # every stage done: all skipped, nothing rewritten
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").glob("*/stage.json")} == stamps


def test_packed_batch_gives_the_padded_batch_loss_and_gradients(tmp_path):
    """Packing rows end to end (block-diagonal mask, positions restarting per row) changes
    neither the SFT loss nor its gradients, and it removes the padding."""
    from thinkrl.config import TaskConfig
    from thinkrl.data import IGNORE, encode_sft_rows
    from thinkrl.models import load_model
    from thinkrl.trainer.common import collate, pack
    from thinkrl.trainer.sft import batch_loss

    model, tok = load_model("tiny-random")
    task = TaskConfig(template="plain")
    rows = [
        {"prompt": q, "completion": c}
        for q, c in [
            ("1 + 1", SHORT),
            ("12 - 7 + 3", LONG),
            ("0 + 2", WRONG),
            ("a much longer question " * 3, LONG),
        ]
    ]
    enc = encode_sft_rows(rows, tok, task, max_len=128)
    padded, packed = collate(enc, tok.pad_token_id), pack(enc, 128, tok.pad_token_id)
    total = sum(len(e.input_ids) for e in enc)
    assert packed["input_ids"].shape[0] < 4 and packed["input_ids"].numel() < padded["input_ids"].numel()
    assert int((packed["labels"] != IGNORE).sum()) == int((padded["labels"] != IGNORE).sum())
    assert packed["input_ids"].numel() >= total
    grads = []
    for batch in (padded, packed):
        model.zero_grad()
        loss, m = batch_loss(model, batch, bf16=False)
        loss.backward()
        grads.append(
            (
                float(loss.detach()),
                m["targets"],
                [p.grad.clone() for p in model.parameters() if p.grad is not None],
            )
        )
    assert grads[0][1] == grads[1][1]
    assert abs(grads[0][0] - grads[1][0]) < 1e-5
    for a, b in zip(grads[0][2], grads[1][2]):
        assert torch.allclose(a, b, atol=1e-5)


def test_rejection_sampling_can_verify_with_a_judge(taught, tmp_path):
    """verifier=judge: an endpoint decides what is correct. A judge that says CORRECT exactly when
    the answer is 2 (the taught task's answer) keeps the same rows as the task's own check."""
    from http.server import ThreadingHTTPServer

    class Judge(BaseHTTPRequestHandler):
        def do_POST(self):
            prompt = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][0][
                "content"
            ]
            pred = prompt.split("Answer to grade:\n", 1)[1].split("\n\n", 1)[0].strip()
            body = json.dumps(
                {
                    "choices": [
                        {"message": {"content": "VERDICT: CORRECT" if pred == "2" else "VERDICT: INCORRECT"}}
                    ]
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Judge)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        common = [
            f"model={taught['model']}",
            f"task.name={taught['task']}",
            "n=6",
            "prompts=6",
            "max_new_tokens=48",
            "temperature=0.5",
            "require_format=false",
            "mode=shortest",
            *TASK,
        ]
        assert main(["sample", *common, f"output={tmp_path / 'rules.jsonl'}"]) == 0
        assert (
            main(
                [
                    "sample",
                    *common,
                    f"output={tmp_path / 'judged.jsonl'}",
                    "verifier=judge",
                    f"verifier_args.url=http://127.0.0.1:{srv.server_address[1]}/v1",
                ]
            )
            == 0
        )
    finally:
        srv.shutdown()
    assert rows(tmp_path / "judged.jsonl") == rows(tmp_path / "rules.jsonl") != []
