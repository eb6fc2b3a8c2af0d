"""The run directory: claimed first thing (a fresh name, or the directory of the checkpoint a resume
continues), locked for the run, and cleared of the temp files a killed save left."""

from __future__ import annotations

import errno
import os
from typing import Optional

from omegaconf import DictConfig

from ..config import ConfigError
from ..core import checkpoint, dist
from ..core.errors import UserError, first_line


def default_run_name(cfg: DictConfig) -> str:
    return f"{cfg.data.dataset}_{cfg.method.name}{'_sec' if cfg.sec.enabled else ''}_s{cfg.run.seed}"


def _candidates(output_dir: str, name: str):
    """<output_dir>/<name>, <name>-2, <name>-3, ..."""
    i = 1
    while True:
        yield os.path.join(output_dir, name if i == 1 else f"{name}-{i}")
        i += 1


def find_resume(cfg: DictConfig) -> Optional[str]:
    """The checkpoint this config continues: run.resume when it is a path; with ``auto`` the
    last.pt of the newest of <name>, <name>-2, ... that has one (None: a fresh run)."""
    r = cfg.run
    if r.resume is None:
        return None
    if r.resume != "auto":
        return r.resume
    latest = None
    for d in _candidates(r.output_dir, r.run_name or default_run_name(cfg)):
        if not os.path.isdir(d):
            break
        if os.path.isfile(os.path.join(d, "last.pt")):
            latest = os.path.join(d, "last.pt")
    return latest


def _claim_new(output_dir: str, name: str) -> str:
    """Create and return the first of <name>, <name>-2, ... that does not exist. os.mkdir (no
    exist_ok) is atomic: of two runs that start together with the same name, one gets <name>
    and the other moves on, so two runs never share a directory or overwrite saved work."""
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the output directory {output_dir}: {exc.strerror}; "
                          "choose another --output-dir") from None
    for d in _candidates(output_dir, name):
        try:
            os.mkdir(d)
            return d
        except FileExistsError:
            continue
        except OSError as exc:
            raise ConfigError(f"cannot create the run directory {d}: {exc.strerror}; "
                              "choose a writable --output-dir") from None


def claim_run_dir(cfg: DictConfig) -> tuple[str, Optional[str]]:
    """(run_dir, checkpoint to resume or None), claimed before anything else happens.

    * fresh run: a new directory <output_dir>/<name>[-N] (see _claim_new);
    * ``--resume auto``: the newest run of that name with a last.pt, in place (else fresh);
    * ``--resume PATH`` into PATH's own directory (run.output_dir / run.run_name name it): in place,
      refused when PATH is older than that run's last.pt (it would discard saved steps) unless
      run.overwrite_newer; into any other directory: a fork, claimed like a fresh run."""
    r = cfg.run
    path = find_resume(cfg)
    if path is None:
        return _claim_new(r.output_dir, r.run_name or default_run_name(cfg)), None
    ckpt_dir = os.path.dirname(os.path.abspath(path))
    target = os.path.abspath(os.path.join(r.output_dir, r.run_name)) if r.run_name else ckpt_dir
    if r.resume == "auto" or os.path.realpath(target) == os.path.realpath(ckpt_dir):
        last = os.path.join(ckpt_dir, "last.pt")
        if os.path.basename(path) != "last.pt" and os.path.isfile(last) and not r.overwrite_newer:
            newer, older = checkpoint.peek_step(last), checkpoint.peek_step(path)
            if newer is not None and older is not None and newer > older:
                raise ConfigError(
                    f"{path} is at step {older} but {last} is at step {newer}: resuming in place would replace "
                    f"{newer - older} saved steps. Fork into a new run with --resume {path} --run-name NEW, or "
                    "replace them on purpose with run.overwrite_newer=true")
        return ckpt_dir, path
    return _claim_new(os.path.dirname(target), os.path.basename(target)), path


def lock_run_dir(run_dir: str):
    """An exclusive lock on ``run_dir/.lock``, held (the returned open file) for the whole run, so a
    second run resuming the same directory (a requeued job while the first still runs, two
    ``--resume auto`` of one name) is refused instead of interleaving its saves. A POSIX record
    lock (lockf), not flock: it belongs to this process only, so the decode workers it forks do
    not hold it after a kill. None where the file system has no locks: the run goes on unguarded."""
    import fcntl

    f = open(os.path.join(run_dir, ".lock"), "a+")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        f.close()
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            raise ConfigError(f"another run is writing into {run_dir} (it holds {run_dir}/.lock); wait for it to "
                              "stop, or start this one elsewhere with --run-name NEW") from None
        return None
    return f


def open_run_dir(cfg: DictConfig) -> tuple[str, Optional[str], Optional[dict], object]:
    """Rank 0 claims the run directory (and finds the checkpoint to resume) for every rank,
    before anything else happens, locks it for the run, and clears the temp files a killed save
    left there; the config records where the run lives. Returns (run_dir, path of the checkpoint
    to resume or None, that checkpoint, the lock to close when the run ends (rank 0; None elsewhere))."""
    claim, lock, error = None, None, None
    if dist.is_main():
        try:
            run_dir, path = claim_run_dir(cfg)
            lock = lock_run_dir(run_dir)  # before the cleanup: a live run's temp file is not stale
            checkpoint.remove_stale_temp_files(run_dir)
            claim = (run_dir, path)
        except Exception as exc:
            if lock is not None:
                lock.close()
            error = exc
            # every rank raises it, not only rank 0: as a one-argument error that surely pickles
            claim = exc if isinstance(exc, UserError) else ConfigError(f"{type(exc).__name__}: {first_line(exc)}")
    claim = dist.broadcast_object(claim)
    if error is not None:
        raise error
    if isinstance(claim, Exception):
        raise claim
    run_dir, resume_path = claim
    cfg.run.run_name = os.path.basename(run_dir)
    cfg.run.output_dir = os.path.dirname(run_dir)
    try:
        ckpt = checkpoint.load(resume_path) if resume_path else None
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    return run_dir, resume_path, ckpt, lock
