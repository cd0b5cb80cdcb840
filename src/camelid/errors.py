"""The one error type users see: a clear line saying what is wrong and what to do."""
from __future__ import annotations

import errno

# A write that cannot finish because the disk (or the file-size limit, `ulimit -f`) is full.
DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class CamelidError(Exception):
    """Bad input or a failed operation; the CLI prints the message on one line and exits with code 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an exception so cleanup (`finally`, temporary outputs) runs; the CLI exits 143."""


def is_disk_full(e: BaseException) -> bool:
    """An OSError for a full disk or file-size limit, or torch's C++ writer failing the same way
    (torch.save reports a short write as RuntimeError "... file write failed")."""
    if isinstance(e, OSError):
        # numpy's tofile reports a short write as OSError("N requested and M written") with no errno
        return e.errno in DISK_FULL or (e.errno is None and "requested and" in str(e) and "written" in str(e))
    return isinstance(e, RuntimeError) and "write failed" in str(e)


def disk_full_error(dest: object) -> CamelidError:
    return CamelidError(f"{dest}: the disk is full (or the file-size limit, ulimit -f, is reached) while writing it; "
                        "nothing was written: free some space and run again")
