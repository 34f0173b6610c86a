"""Shared-memory arenas (float32, or bf16 for the bf16 copies) (POSIX shm, names `coregpt-<random>`, mode 0600).

The coordinator creates every segment, workers attach, and the coordinator
unlinks the names as soon as all workers hold a mapping: from then on no
/dev/shm entry exists that a crash could leak, and the memory is freed when
the last process that maps it exits, however it exits.
"""
import os
import secrets
import sys
from multiprocessing import resource_tracker, shared_memory

import numpy as np

from trainer.errors import ResourceError

PREFIX = "coregpt-"  # + 20 hex digits: 29 bytes with the leading /, under macOS's limit of 31


class SharedArena:
    def __init__(self, shm, n, dtype):
        self.shm = shm
        self.name = shm.name
        self.array = np.ndarray((n,), dtype=dtype, buffer=shm.buf)
        self.linked = True

    @classmethod
    def create(cls, n, dtype=np.float32):
        # SharedMemory creates with O_CREAT|O_EXCL and mode 0600
        size = max(4, np.dtype(dtype).itemsize * n)
        shm = shared_memory.SharedMemory(name=PREFIX + secrets.token_hex(10), create=True, size=size)
        if hasattr(os, "posix_fallocate"):  # reserve it now: a full /dev/shm is an error, not a SIGBUS later
            try:
                os.posix_fallocate(shm._fd, 0, size)
            except OSError as e:
                shm.close()
                shm.unlink()
                raise ResourceError(f"shared memory: cannot reserve {size / 1e6:,.0f} MB in /dev/shm "
                                    f"({e.strerror}); in Docker run with --shm-size or --ipc=host, or "
                                    f"choose a smaller --model or --batch-size") from None
        return cls(shm, n, dtype)

    @classmethod
    def attach(cls, name, n, dtype=np.float32):
        if sys.version_info >= (3, 13):
            shm = shared_memory.SharedMemory(name=name, track=False)
        else:
            shm = shared_memory.SharedMemory(name=name)
            # before 3.13 attaching registers the segment with this process's
            # resource tracker, which would unlink it when this worker exits
            resource_tracker.unregister(shm._name, "shared_memory")
        arena = cls(shm, n, dtype)
        arena.linked = False  # the coordinator owns the name
        return arena

    def unlink(self):
        if self.linked:
            self.linked = False
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass

    def close(self):
        self.array = None
        try:
            self.shm.close()
        except BufferError:
            pass  # a view is still alive; the mapping goes with the process
