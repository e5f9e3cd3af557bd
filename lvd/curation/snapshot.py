"""What a run folder held before a flow, so a flow that refuses can leave it as it was.

`take(run_dir)` lists every file with its size and modification time; `rollback(run_dir,
before)` deletes what appeared since (files, then folders left empty) and returns the paths of
files that existed before but changed, which it cannot restore (none do when a stage refuses:
the guarded stages write nothing until their check passes, and stages that only skip done
work rewrite nothing). The listing costs one stat per file: partitions, not images.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

Snapshot = dict[str, tuple[int, int]]


def take(run_dir: Path) -> Snapshot | None:
    """Every path under `run_dir` with (size, mtime) (folders: (-1, 0)); None when it does not exist."""
    snap: Snapshot = {}
    if not Path(run_dir).is_dir():
        return None
    for root, dirs, files in os.walk(run_dir):
        for name in dirs + files:
            p = Path(root) / name
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue
            snap[str(p.relative_to(run_dir))] = (
                st.st_size if name in files else -1,
                st.st_mtime_ns if name in files else 0,
            )
    return snap


def rollback(run_dir: Path, before: Snapshot | None) -> list[str]:
    """Delete what is new since `before` (the folder itself when it did not exist); return
    the files that existed before and changed."""
    run_dir = Path(run_dir)
    if before is None:
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)
        return []
    now = take(run_dir) or {}
    changed = sorted(p for p, v in now.items() if p in before and v != before[p] and v[0] >= 0)
    new = sorted((p for p in now if p not in before), key=lambda p: -p.count(os.sep))
    for p in new:
        path = run_dir / p
        if now[p][0] >= 0 or path.is_symlink():
            path.unlink(missing_ok=True)
        else:
            with contextlib.suppress(OSError):
                path.rmdir()
    return changed
