"""The run folder: a fresh run never writes over another run's checkpoints or log, and two runs
never write into one folder at once."""

from __future__ import annotations

import atexit
import fcntl
import os


def check_run_folder(out: str, resuming: bool) -> None:
    """A fresh run must not overwrite another run's checkpoints nor append to its log; a run
    is resumed from its last.pt only (best.pt holds no optimiser state)."""
    found = [f for f in ("last.pt", "best.pt", "log.jsonl") if os.path.exists(os.path.join(out, f))]
    if found and not resuming:
        how = ("continue it with --resume auto" if "last.pt" in found else
               "it has no last.pt to resume from")
        raise FileExistsError(f"{out} already holds a run ({', '.join(found)}): {how}, or "
                              "choose a new --out")


def claim_run_folder(out: str, is_main: bool) -> None:
    """Create the run folder and hold it for this run: rank 0 takes an exclusive lock on
    OUT/.lock for as long as the process lives (the system releases it when the process dies,
    however it dies), so that a second run started into the same folder stops instead of
    interleaving its log and checkpoints with this one's. Rank 0 also removes the temporary
    files of a run killed while writing a checkpoint (the checkpoint itself is intact)."""
    os.makedirs(out, exist_ok=True)
    if not is_main:
        return
    key = os.path.abspath(out)
    if key in _HELD:  # this process's earlier run into the folder has ended
        _HELD.pop(key).close()
    lock = open(os.path.join(out, ".lock"), "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise FileExistsError(f"another run is writing to {out} (it holds {out}/.lock): wait "
                              "for it to end, or choose another --out") from None
    _HELD[key] = lock
    for name in os.listdir(out):
        if ".pt.tmp." in name:
            os.remove(os.path.join(out, name))


def release_run_folder(out: str) -> None:
    """The end of a run: another may start in its folder (with --resume auto)."""
    lock = _HELD.pop(os.path.abspath(out), None)
    if lock is not None:
        lock.close()


_HELD: dict = {}  # run folder -> the open lock file this process holds on it
atexit.register(lambda: [lock.close() for lock in _HELD.values()])  # a run that raised
