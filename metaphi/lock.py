"""One run per output folder.

A command that writes into a folder first claims it (:func:`claim`, which :func:`metaphi.config.writable_dir`
calls): an exclusive ``flock`` on ``FOLDER/.lock``, whose text names the holder (process id, host, the
command, since when). A second command on the same folder while the first runs is refused with a
UsageError (exit code 2) that names the holder. The lock belongs to the open file, so the system
releases it when its process ends in any way, ``kill -9`` included: a lock file left by a killed run
is never in the way (its text is stale, the lock is not). Claims last until :func:`release_all`
(``metaphi.cli.main`` calls it when the command ends) or the process exits.

On claiming a folder its leftover temporary files are removed: ``.tmp-*`` files of atomic writes a
kill interrupted (a held lock means no other process of ours is writing there), in the folder and in
the subfolders that hold no lock file of their own.

Under ``torchrun`` only rank 0 claims (all ranks share the run's folder). Where ``fcntl`` is missing
(Windows) folders are not locked.
"""
from __future__ import annotations

import os
import socket
import time

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

from metaphi.config import UsageError

LOCK = ".lock"
#: what :func:`claim` writes as the holder's command (``metaphi.cli.main`` sets the command line)
command = "metaphi"
_held: dict[str, int] = {}


def claim(folder: str) -> None:
    """Hold ``folder`` (which must exist) for this process, or a UsageError naming who holds it."""
    key = os.path.realpath(folder)
    if key in _held or fcntl is None or os.environ.get("RANK", "0") not in ("", "0"):
        return
    path = os.path.join(folder, LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 1000).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise UsageError(f"--out {folder} is in use by {holder}; wait for that run to end or choose another --out")
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} ({command}, since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode())
    _held[key] = fd
    remove_temporaries(folder)


def remove_temporaries(folder: str) -> list[str]:
    """Delete the ``.tmp-*`` files of interrupted atomic writes in ``folder`` and in its subfolders
    that are not locked folders of their own; the paths removed."""
    removed = []
    for here, dirs, files in os.walk(folder):
        if here != folder and LOCK in files:
            dirs[:] = []
            continue
        for f in files:
            if f.startswith(".tmp-"):
                p = os.path.join(here, f)
                try:
                    os.unlink(p)
                    removed.append(p)
                except OSError:
                    pass
    return removed


def release_all() -> None:
    """Give up every folder this process holds."""
    for fd in _held.values():
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
    _held.clear()
