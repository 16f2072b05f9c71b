"""``push_to_hub=``: the finished ``final/`` is uploaded after the run, on rank 0; a failed upload
is one error that names the saved folder, and the folder stays."""

import json
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants

from thinkrl.cli import main
from thinkrl.errors import ConfigError
from thinkrl.hub import check_repo_id, pop_push_args, push_folder

SFT = ["sft", "model=tiny-random", "progress=false", "task.template=plain", "dtype=fp32", "max_steps=1"]


@pytest.fixture
def hub(monkeypatch):
    """HfApi's two calls, recorded: the repository, the folder's files, and whether the upload
    saw the hub online."""
    calls = []

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
        calls.append(("create", repo_id, private, exist_ok))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, commit_message=None, repo_type=None):
        files = sorted(p.name for p in Path(folder_path).iterdir())
        calls.append(("upload", repo_id, Path(folder_path), files, constants.HF_HUB_OFFLINE))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr("thinkrl.hub.USER_SET_OFFLINE", False)
    return calls


def data(tmp_path):
    path = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"{i} + 1", "completion": f"<answer> {i + 1} </answer>"} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_repo_ids_are_checked_before_anything_runs():
    assert check_repo_id("me/tiny-rl.v2") == "me/tiny-rl.v2"
    assert check_repo_id("tiny") == "tiny"
    for bad in ("me/", "/x", "a/b/c", "me/has space", "me/..", "-me/x", ""):
        with pytest.raises(ConfigError, match="not a Hub repository id"):
            check_repo_id(bad)
    assert pop_push_args(["lr=1", "push_to_hub=me/m", "hub_private=true"]) == (
        ["lr=1"],
        {"repo_id": "me/m", "private": True},
    )
    assert pop_push_args(["lr=1"]) == (["lr=1"], None)
    with pytest.raises(ConfigError, match="needs push_to_hub"):
        pop_push_args(["hub_private=true"])


def test_sft_pushes_its_final_folder_online_then_restores_offline(tmp_path, hub):
    out = tmp_path / "o"
    before = constants.HF_HUB_OFFLINE
    args = [f"data={data(tmp_path)}", f"output_dir={out}", "push_to_hub=me/tiny-sft", "hub_private=true"]
    assert main([*SFT, *args]) == 0
    assert hub[0] == ("create", "me/tiny-sft", True, True)
    kind, repo, folder, files, offline = hub[1]
    assert (kind, repo, folder, offline) == ("upload", "me/tiny-sft", out / "final", False)
    assert {"config.json", "model.safetensors"} <= set(files)
    assert constants.HF_HUB_OFFLINE == before


def test_a_bad_repo_id_fails_before_training(tmp_path, hub, capsys):
    out = tmp_path / "o"
    assert main([*SFT, f"data={data(tmp_path)}", f"output_dir={out}", "push_to_hub=a/b/c"]) == 2
    assert "not a Hub repository id" in capsys.readouterr().err
    assert not out.exists() and hub == []


def test_a_failed_upload_keeps_the_folder_and_says_how_to_retry(tmp_path, monkeypatch, capsys):
    def refuse(self, *a, **k):
        raise OSError("no route to host")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", refuse)
    monkeypatch.setattr("thinkrl.hub.USER_SET_OFFLINE", False)
    out = tmp_path / "o"
    assert main([*SFT, f"data={data(tmp_path)}", f"output_dir={out}", "push_to_hub=me/m"]) == 2
    err = capsys.readouterr().err
    assert "no route to host" in err and f"thinkrl push {out / 'final'} repo=me/m" in err
    assert (out / "final" / "model.safetensors").is_file()


def test_push_respects_an_offline_flag_the_user_set(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr("thinkrl.hub.USER_SET_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        push_folder(tmp_path, "me/m")
    with pytest.raises(ConfigError, match="not a model folder"):
        push_folder(tmp_path / "missing", "me/m")


def test_thinkrl_push_uploads_a_folder(tmp_path, hub):
    (tmp_path / "config.json").write_text("{}")
    assert main(["push", str(tmp_path), "repo=me/m"]) == 0
    assert hub[0] == ("create", "me/m", False, True) and hub[1][2] == tmp_path
    assert main(["push", str(tmp_path)]) == 2
