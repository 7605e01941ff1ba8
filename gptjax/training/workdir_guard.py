"""A training workdir: made (or refused) in one line, and held by one writer at a time.

`WorkdirLock` takes an exclusive `fcntl.flock` on WORKDIR/.lock and writes the holder's PID into
it; the OS releases it when the process ends, kill -9 included. Readers (generate, eval, analyze,
embed) never take it.
"""

from __future__ import annotations

import errno
import fcntl
import os

from gptjax.config_schema import ConfigError

LOCK_NAME = ".lock"


def prepare_workdir(workdir: str) -> str:
  """Creates `workdir` if needed; a path that is a file, under a file or read-only is one line."""
  path = os.path.abspath(workdir)
  parent = path
  while parent and not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"--workdir={workdir} is a file, not a folder; give a folder path")
  if parent != path and not os.path.isdir(parent):
    raise ConfigError(f"--workdir={workdir} is under {parent}, which is a file; give a folder path")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} cannot be created ({e.strerror}); give a folder you "
                      "can write to") from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise ConfigError(f"--workdir={workdir} is not writable; give a folder you can write to, or "
                      "use --mode=eval/generate to read its checkpoints")
  return path


class WorkdirLock:
  """Context manager: the exclusive writer's lock on a workdir (ConfigError if another run holds it)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
    self._fd = None

  def acquire(self) -> "WorkdirLock":
    """Takes the lock or raises ConfigError naming the holder's PID."""
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise ConfigError(f"cannot create {self.path} ({e.strerror}); the workdir must be "
                        "writable") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise ConfigError(f"cannot lock {self.path} ({e.strerror})") from None
      raise ConfigError(f"workdir {os.path.dirname(self.path)} is in use by another run (pid "
                        f"{holder}); wait for it to finish, stop it, or give another --workdir"
                        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    """Lets the next writer in (the file stays; its content is only the last holder's PID)."""
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()
