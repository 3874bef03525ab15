"""A run directory belongs to one run.

* **One writer.** :func:`claim` takes an exclusive ``fcntl`` lock on ``.misa-fast.lock`` in the
  directory for as long as the run (train, finetune, a sweep trial) lives; a second process on the
  same directory is refused with one line naming the holder. The kernel drops the lock when the
  holder dies, however it dies, so a killed run never leaves the directory locked.
* **Nothing overwritten by accident.** A directory that holds a run's files is continued only with
  ``--resume`` (from its checkpoint) and replaced only with ``--overwrite``.
* **No litter.** Temporary files that a killed process left behind (a half-written checkpoint or
  export) are removed once the lock is held: no process of this project can be writing them then.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Iterator, Optional

from misa_fast.errors import UserError
from misa_fast.training.checkpoint import CHECKPOINT_NAME, POLICY_NAME

LOCK_NAME = ".misa-fast.lock"
# What a run writes; finished-run files say that the directory's run ended (checkpoint or not).
RUN_FILES = (CHECKPOINT_NAME, "config.json", "progress.csv", "summary.json", POLICY_NAME, "learning_curve.png", "tb")
FINISHED_RUN_FILES = ("summary.json", POLICY_NAME, "learning_curve.png")
# Temporary files of the atomic writers (misa_fast.training.checkpoint, ProgressLog's truncation).
STALE_PATTERNS = (".*.tmp-*", ".tmp-*", "*.csv.tmp")


class RunDirectoryBusy(UserError):
    """Another process holds the run directory."""


class RunDirectoryTaken(UserError, FileExistsError):
    """The directory holds another run's files and neither --resume nor --overwrite was given."""


def describe_os_error(err: OSError, what: str) -> str:
    """``what``: the OS error's own words, without errno numbers or a traceback."""
    reason = err.strerror or str(err)
    where = f" ({err.filename})" if err.filename and str(err.filename) not in what else ""
    return f"{what}: {reason}{where}"


@contextlib.contextmanager
def claim(out: os.PathLike, command: str, option: str = "--out") -> Iterator[Path]:
    """Holds ``out`` for the block: creates it, locks it (refusing with :class:`RunDirectoryBusy`
    when another process holds it) and removes stale temporary files. ``option`` names the
    option the directory came from, for the messages."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = open(out / LOCK_NAME, "a+")
    except OSError as err:
        raise UserError(describe_os_error(err, f"{option} {out}: cannot write the run directory")) from None
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(describe_os_error(err, f"{option} {out}: cannot lock the run directory")) from None
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunDirectoryBusy(f"{option} {out} is in use by {holder}; wait for that run to end or choose "
                                   f"another {option}") from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"misa-fast {command} (pid {os.getpid()} on {socket.gethostname()}, since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n")
            handle.flush()
        except OSError as err:
            raise UserError(describe_os_error(err, f"{option} {out}: cannot write the run directory")) from None
        remove_stale_files(out)
        yield out
        with contextlib.suppress(OSError):  # the holder's line goes with the hold
            handle.truncate(0)
    finally:
        handle.close()  # closing the descriptor releases the lock


def remove_stale_files(out: Path) -> list:
    """Removes the temporary files an interrupted writer left in ``out`` (call with the lock held)."""
    removed = []
    for pattern in STALE_PATTERNS:
        for path in out.glob(pattern):
            if path.name == LOCK_NAME:
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def run_files(out: Path) -> list:
    """The run files present in ``out``."""
    return [name for name in RUN_FILES if (out / name).exists()]


def prepare(out: Path, resume: bool, overwrite: bool, option: str = "--out") -> bool:
    """Decides what happens to the run in ``out`` (call with the lock held); returns whether there
    is a checkpoint to resume.

    A checkpoint is resumed with ``--resume``; a directory with run files and no ``--resume`` is
    refused unless ``--overwrite`` (which removes them); ``--resume`` of a directory whose run
    finished but whose checkpoint is gone is refused too (there is nothing to continue, and
    starting over would replace the finished run's results)."""
    present = run_files(out)
    has_checkpoint = CHECKPOINT_NAME in present
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other: --resume continues the run in "
                        f"{option} {out}, --overwrite replaces it")
    if overwrite:
        remove_run_files(out)
        return False
    if has_checkpoint:
        if not resume:
            raise RunDirectoryTaken(f"{option} {out} already holds a run with a checkpoint: pass --resume to "
                                    "continue it, --overwrite to replace it, or choose another " + option)
        return True
    finished = [name for name in present if name in FINISHED_RUN_FILES]
    if resume and finished:
        raise RunDirectoryTaken(f"{option} {out} holds a finished run ({', '.join(finished)}) but no {CHECKPOINT_NAME} "
                                "to resume from: pass --overwrite to replace it, or choose another " + option)
    if present and not resume:
        raise RunDirectoryTaken(f"{option} {out} already holds a run's files ({', '.join(present)}): pass "
                                f"--overwrite to replace them, or choose another {option}")
    if present:  # --resume of a run that was stopped before its first checkpoint: nothing to keep
        remove_run_files(out)
    return False


def remove_run_files(out: Path) -> None:
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def kept_checkpoint(out: Path, sentence: bool = False) -> str:
    """What a stop leaves in ``out``: its last good checkpoint, or none (a stop before the first)."""
    path = out / CHECKPOINT_NAME
    text = (f"the last good checkpoint ({path}) was left untouched" if path.exists() else
            f"no checkpoint had been written yet in {out}")
    return text[0].upper() + text[1:] + "." if sentence else text


def resume_command(command: str, out: Path, steps: Optional[int] = None, seeds: Optional[str] = None) -> str:
    parts = [f"misa-fast {command}", "--out", str(out)]
    if seeds:
        parts += ["--seeds", seeds]
    if steps is not None:
        parts += ["--steps", str(steps)]
    return " ".join(parts + ["--resume"])
