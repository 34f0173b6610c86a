"""Files that are either whole or absent: written under a temporary name,
fsynced, then renamed over the target."""
import contextlib
import os


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
