"""One training run per workdir: an advisory lock on `WORKDIR/.train.lock`.

Two runs in one workdir race on orbax's temporary directories (one dies with
FileNotFoundError), interleave their records in metrics.jsonl and keep more
checkpoints than `keep_checkpoints`. So a run takes an exclusive, non-blocking
`fcntl.flock` on a file in the workdir before it imports jax, and keeps the file open
for as long as it trains; a second run fails at once with "workdir W is locked by pid P
on host H". The lock belongs to the open file, not to the file's existence: the kernel
drops it when the holder exits however it exits (SIGKILL and power loss included), so a
crashed run never leaves a stale lock, and the file itself stays behind (harmless; do
not delete it while a run holds it, or a second run could lock a new file). The pid
written in it is only for the message.

Who takes it: `experiments/train.py` (process 0 of a multi-process run only: all its
processes share the workdir) and `trainer.train_and_evaluate`, which takes it again in
the same process at no cost, so notebooks and scripts that call the trainer directly
are covered too. `experiments.evaluate` takes no lock: it only reads checkpoints
(through a read-only manager that never saves, deletes or moves anything) and writes
under `eval/step_<step>/`, so it may run beside a training run.

flock is per host on local filesystems; on NFS, Linux maps it to a byte-range lock that
the server arbitrates between clients. Filesystems without locks (some FUSE mounts)
raise OSError here, which names the lock file.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from typing import Dict, List

LOCK_FILE = ".train.lock"


class WorkdirLockedError(RuntimeError):
  """Another process holds the workdir's lock."""


# lock path -> [open lock file, how many holds this process has on it]
_HELD: Dict[str, List] = {}


def _lock_path(workdir: str) -> str:
  return os.path.join(os.path.realpath(workdir), LOCK_FILE)


def acquire(workdir: str) -> None:
  """Locks `workdir` (creating it) for this process; a process may acquire it again.

  Raises:
    WorkdirLockedError: another process holds it ("workdir W is locked by pid P").
  """
  path = _lock_path(workdir)
  if path in _HELD:
    _HELD[path][1] += 1
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  f = open(path, "a+", encoding="utf-8")  # not truncated: the holder's pid stays readable
  try:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    f.seek(0)
    holder = f.read().strip() or "unknown"
    f.close()
    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      raise OSError(e.errno, f"cannot lock {path}: {e.strerror}") from e
    raise WorkdirLockedError(
        f"workdir {workdir} is locked by pid {holder}: another training run is using "
        f"it (lock file {path}). Wait for it to finish or stop it, or choose another "
        "--workdir.") from None
  f.seek(0)
  f.truncate()
  f.write(f"{os.getpid()} on host {socket.gethostname()}\n")
  f.flush()
  _HELD[path] = [f, 1]


def release(workdir: str) -> None:
  """Undoes one `acquire`; the last one unlocks."""
  path = _lock_path(workdir)
  held = _HELD.get(path)
  if held is None:
    raise ValueError(f"workdir {workdir} is not locked by this process.")
  held[1] -= 1
  if held[1] == 0:
    del _HELD[path]
    held[0].close()  # closing the file drops the flock


@contextlib.contextmanager
def hold(workdir: str, enabled: bool = True):
  """`acquire` ... `release` around a block (no-op when not `enabled`)."""
  if not enabled:
    yield
    return
  acquire(workdir)
  try:
    yield
  finally:
    release(workdir)
