"""Files that are either whole or absent: written under a temporary name,
fsynced, then renamed over the target."""
import contextlib
import os


def plain_mode(path):
    """Give `path` the mode open() gives a new file (0666 less the umask): safetensors
    writes its files 0600, which other users of a shared model directory cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


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
