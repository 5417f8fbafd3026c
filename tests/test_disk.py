"""apps/disk.py: the app's output folders are deleted after their age."""

from __future__ import annotations

import os
import time

from apps.disk import OutputFolders


def test_output_folders_are_deleted_after_their_age(tmp_path):
    folders = OutputFolders(max_age=60, root=tmp_path / "out")
    old, new = folders.new(), folders.new()
    (old / "a.png").write_bytes(b"x")
    past = time.time() - 120
    os.utime(old, (past, past))
    assert folders.sweep() == 1 and not old.exists() and new.exists()
    folders.close()
    assert not (tmp_path / "out").exists()


def test_roots_left_by_stopped_servers_are_removed_by_the_next(tmp_path):
    import subprocess
    import sys

    from apps.disk import OWNER, remove_abandoned

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, alive, unowned, fresh = (tmp_path / name for name in ("dead", "alive", "unowned", "fresh"))
    for root in (dead, alive, unowned, fresh):
        (root / "protect-x").mkdir(parents=True)
        (root / "protect-x" / "a.png").write_bytes(b"x")
    (dead / OWNER).write_text(gone.stdout.strip())  # a server stopped by SIGTERM: its process is gone
    (alive / OWNER).write_text(str(os.getpid()))  # a running server, however idle
    past = time.time() - 7200
    os.utime(unowned, (past, past))
    os.utime(alive, (past, past))
    assert remove_abandoned(tmp_path, max_age=3600) == 2
    assert not dead.exists() and not unowned.exists() and alive.exists() and fresh.exists()
    folders = OutputFolders(max_age=60, root=tmp_path / "mine")
    assert (folders.root / OWNER).read_text() == str(os.getpid())
    past = time.time() - 120
    os.utime(folders.root / OWNER, (past, past))
    folders.sweep()
    assert (folders.root / OWNER).exists()  # the sweep keeps the owner mark
    folders.close()
