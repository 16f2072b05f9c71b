"""``push_to_hub=OWNER/NAME``: upload a finished model folder to the Hugging Face Hub.

``thinkrl train``, ``sft``, ``dpo`` and ``rm`` take ``push_to_hub=OWNER/NAME`` (and
``hub_private=true``). The repository name is checked before any model loads; the upload runs
after the run has written ``final/``, on rank 0 only. So a push that fails (no network, no
token, no permission) never costs a checkpoint: the error names the saved folder and the
``thinkrl push`` command that retries the upload.

The command line sets ``HF_HUB_OFFLINE=1`` unless the user set it, because training needs no
hub. A requested push lifts that default for the upload alone; an ``HF_HUB_OFFLINE`` the user set
is respected, and is then one clear error.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path

from thinkrl.errors import ConfigError

# Hub repository ids: an optional owner, then a name, each of letters, digits, '-', '_' and '.'
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
USER_SET_OFFLINE = "HF_HUB_OFFLINE" in os.environ  # read before the command line sets its default


class PushError(ConfigError):
    """The upload failed; the model folder is intact."""


def check_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not _REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise ConfigError(
            f"push_to_hub: {repo_id!r} is not a Hub repository id; expected OWNER/NAME "
            "(letters, digits, '-', '_' and '.')"
        )
    return repo_id


def pop_push_args(items: list[str]) -> tuple[list[str], dict | None]:
    """Take ``push_to_hub=`` and ``hub_private=`` out of a command's overrides."""
    rest, repo, private = [], None, False
    for item in items:
        key, _, value = item.partition("=")
        if key == "push_to_hub":
            repo = check_repo_id(value)
        elif key == "hub_private":
            if value.lower() not in ("true", "false"):
                raise ConfigError(f"hub_private: expected true or false, got {value!r}")
            private = value.lower() == "true"
        else:
            rest.append(item)
    if private and repo is None:
        raise ConfigError("hub_private=true needs push_to_hub=OWNER/NAME")
    return rest, (None if repo is None else {"repo_id": repo, "private": private})


@contextmanager
def _online():
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def push_folder(folder: str | Path, repo_id: str, private: bool = False, message: str | None = None) -> str:
    """Create ``repo_id`` if needed and upload ``folder`` to it; returns the repository's URL."""
    folder = Path(folder)
    check_repo_id(repo_id)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"push: {folder} is not a model folder (it has no config.json)")
    retry = f"the model is saved in {folder}; retry with: thinkrl push {folder} repo={repo_id}"
    if USER_SET_OFFLINE and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise PushError(f"push_to_hub: HF_HUB_OFFLINE is set, so nothing can be uploaded; {retry}")
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        with _online():
            url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(
                repo_id=repo_id,
                folder_path=str(folder),
                commit_message=message or f"thinkrl: upload {folder.name}",
                repo_type="model",
            )
    except Exception as e:  # network, auth, permissions: one message, the folder untouched
        raise PushError(f"push_to_hub to {repo_id} failed ({type(e).__name__}: {e}); {retry}") from None
    return str(url)


def push_after(run, push: dict | None, folder_of) -> object:
    """Run ``run()``, then (rank 0, when asked) push the folder ``folder_of(result)``."""
    result = run()
    if push is not None and os.environ.get("RANK", "0") == "0":
        folder = folder_of(result)
        print(f"pushed {folder} to {push_folder(folder, push['repo_id'], private=push['private'])}")
    return result
