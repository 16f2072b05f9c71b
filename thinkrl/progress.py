"""One progress bar for the commands that run a while: ``train``, ``sft``, ``dpo``, ``rm``,
``eval``, ``sample`` and ``difficulty``.

Silent when ``enabled`` is false (the ``progress=false`` key, or a rank other than 0). The
bars of ``eval``, ``sample`` and ``difficulty`` are also silent when stderr is not a terminal
(a log file, a pipe, a test's captured output: tqdm's ``disable=None``); the training bars
(``tty_only=False``) show in a log too, where they are the run's heartbeat."""

from __future__ import annotations


def progress_bar(
    total: int, desc: str, *, enabled: bool = True, unit: str = "it", initial: int = 0, tty_only: bool = True
):
    """A tqdm bar of ``total`` steps on stderr, from ``initial`` (a resumed run); a no-op bar when
    it should be silent."""
    from tqdm.auto import tqdm

    disable = True if not enabled else None if tty_only else False
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=disable, dynamic_ncols=True)
