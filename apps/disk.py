"""The app's own output folders, deleted after a stated age (Gradio's ``delete_cache`` handles its copies).

Each ``/protect`` request writes its PNG files into a new folder under one root per server process
(``<tmp>/steerguard-outputs/<pid>-<random>``). :meth:`OutputFolders.sweep` deletes the folders older than
``max_age`` seconds; it runs before every new folder, every ``max_age / 2`` seconds in a daemon thread once
:meth:`OutputFolders.start` is called, and the whole root goes when the process exits.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
import time
from pathlib import Path

__all__ = ["OutputFolders"]


class OutputFolders:
    """New per-request folders under ``root`` (default: a fresh folder in the system temp dir)."""

    def __init__(self, max_age: float = 3600.0, root: Path | None = None) -> None:
        if not max_age > 0:
            raise ValueError(f"max_age must be positive seconds, got {max_age!r}")
        self.max_age = max_age
        base = Path(tempfile.gettempdir()) / "steerguard-outputs"
        base.mkdir(parents=True, exist_ok=True)
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(dir=base))
        self.root.mkdir(parents=True, exist_ok=True)
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
