"""The app's own output folders, deleted after a stated age (Gradio's ``delete_cache`` handles its copies).

Each ``/protect`` request writes its PNG files into a new folder under one root per server process
(``<tmp>/steerguard-outputs/<random>``, its owner's pid in ``.owner``). :meth:`OutputFolders.sweep` deletes
the folders older than ``max_age`` seconds; it runs before every new folder, every ``max_age / 2`` seconds in a
daemon thread once :meth:`OutputFolders.start` is called, and the whole root goes when the process exits. A
process stopped without running its exit handlers (SIGTERM, SIGKILL, a crash) leaves its root behind: the next
server deletes every root whose owner is no longer running.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

__all__ = ["OutputFolders", "remove_abandoned"]
OWNER = ".owner"  # in each root: the pid of the server process that writes there


def running(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: it exists
        return True
    return True


def remove_abandoned(base: Path, max_age: float, now: float | None = None) -> int:
    """Delete the roots under ``base`` whose owner process is gone (or, with no owner recorded, that nothing has
    touched for ``max_age`` seconds); returns how many."""
    now = time.time() if now is None else now
    removed = 0
    for root in list(base.iterdir()) if base.is_dir() else []:
        if not root.is_dir():
            continue
        try:
            owner = int((root / OWNER).read_text().strip())
        except (OSError, ValueError):
            owner = None
        try:
            abandoned = not running(owner) if owner is not None else now - root.stat().st_mtime > max_age
        except FileNotFoundError:
            continue
        if abandoned:
            shutil.rmtree(root, ignore_errors=True)
            removed += 1
    return removed


class OutputFolders:
    """New per-request folders under ``root`` (default: a fresh folder in the system temp dir)."""

    def __init__(self, max_age: float = 3600.0, root: Path | None = None) -> None:
        if not max_age > 0:
            raise ValueError(f"max_age must be positive seconds, got {max_age!r}")
        self.max_age = max_age
        base = Path(tempfile.gettempdir()) / "steerguard-outputs"
        base.mkdir(parents=True, exist_ok=True)
        if root is None:
            remove_abandoned(base, max_age)
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(dir=base))
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / OWNER).write_text(str(os.getpid()))
        self._stop = threading.Event()
        atexit.register(self.close)

    def new(self, prefix: str = "protect-") -> Path:
        """A new empty folder (older folders are swept first)."""
        self.sweep()
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self.root))

    def sweep(self, now: float | None = None) -> int:
        """Delete the folders (and files) under the root last modified more than ``max_age`` seconds ago."""
        now = time.time() if now is None else now
        removed = 0
        for path in list(self.root.iterdir()) if self.root.is_dir() else []:
            if path.name == OWNER:
                continue
            try:
                if now - path.stat().st_mtime <= self.max_age:
                    continue
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                removed += 1
            except FileNotFoundError:  # a concurrent sweep got there first
                continue
        return removed

    def start(self) -> None:
        """Sweep every ``max_age / 2`` seconds in a daemon thread until :meth:`close`."""

        def loop() -> None:
            while not self._stop.wait(self.max_age / 2):
                self.sweep()

        threading.Thread(target=loop, name="steerguard-sweeper", daemon=True).start()

    def close(self) -> None:
        """Stop sweeping and delete the root with everything in it."""
        self._stop.set()
        shutil.rmtree(self.root, ignore_errors=True)
