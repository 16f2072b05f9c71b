"""One progress bar for the commands that run a while (``thinkrl eval``, ``thinkrl sample``).

Silent when ``enabled`` is false (the ``progress=false`` key) and when stderr is not a
terminal (a log file, a pipe, a test's captured output): tqdm's ``disable=None``."""

from __future__ import annotations


def progress_bar(total: int, desc: str, *, enabled: bool = True, unit: str = "it"):
    """A tqdm bar of ``total`` steps on stderr; a no-op bar when it should be silent."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=None if enabled else True, dynamic_ncols=True)
