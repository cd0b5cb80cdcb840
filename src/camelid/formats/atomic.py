"""Outputs are never half-written: build under a temporary name beside the destination, rename when complete."""
from __future__ import annotations

import os
import shutil
import signal
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..errors import CamelidError, Terminated, disk_full_error, is_disk_full


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


@contextmanager
def atomic_output(dest: str | Path, *, force: bool = False, is_dir: bool = True) -> Iterator[Path]:
    """Yield a temporary path (a fresh folder if `is_dir`) in dest's folder; on success it replaces `dest`.

    On any error, Ctrl-C or SIGTERM the temporary output is removed and `dest` is left as it was.
    """
    dest = Path(dest)
    if dest.exists() and not force:
        raise CamelidError(f"{dest} already exists; pass --force to replace it")
    parent = dest.parent if str(dest.parent) else Path(".")
    if not parent.is_dir():
        raise CamelidError(f"{parent}: the output's parent folder does not exist")
    tmp = parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    if is_dir:
        tmp.mkdir()

    # SIGTERM normally kills the process without running `finally`; turn it into an exception.
    def _on_term(signum, frame):  # noqa: ARG001
        raise Terminated("terminated")

    previous = signal.signal(signal.SIGTERM, _on_term) if _is_main_thread() else None
    try:
        yield tmp
        if dest.exists():
            _remove(dest)
        os.replace(tmp, dest)
    except (OSError, RuntimeError) as e:
        _remove(tmp)
        if is_disk_full(e):
            raise disk_full_error(dest) from None
        raise
    except BaseException:
        _remove(tmp)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _is_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
