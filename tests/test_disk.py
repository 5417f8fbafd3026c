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
