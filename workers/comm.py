"""Communication between machines.  On one machine (`--backend shm`) the group
is just this process; under `mpiexec` (`--backend mpi`) each rank runs its own
shared-memory workers, and ranks sum their node-reduced gradients with MPI.
Every rank keeps full parameters and Adam moments and applies the same update,
so they stay bit-identical without an all-gather."""
import os

import numpy as np

from trainer.errors import ConfigError, DataError, ResourceError, WeightsError

MESSAGE_BYTES = 4096


def error_kinds():
    """The setup errors a rank can report to the others, by index."""
    return [ConfigError, DataError, WeightsError, ResourceError, RuntimeError]


class LocalGroup:
    rank, size, local_rank, local_size, is_root = 0, 1, 0, 1, True

    def sum(self, value):
        return value

    def allreduce(self, array):
        pass

    def any(self, flag):
        return bool(flag)

    def agree(self, error):
        """Raise the setup error, if any (under MPI: any rank's, on every rank)."""
        if error is not None:
            raise error

    def abort(self, code):
        pass

    def identical(self, digest):
        return True


class MPIGroup:
    def __init__(self):
        try:
            from mpi4py import MPI
        except ImportError:
            raise ConfigError("--backend mpi needs mpi4py and an MPI: pip install 'coregpt[mpi]', "
                              "then run under mpiexec") from None
        self.MPI, self.comm = MPI, MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        unlink_mpich_segments(node)
        node.Free()
        self.is_root = self.rank == 0

    def sum(self, value):
        buf = np.array([value], dtype=np.float64)
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return float(buf[0])

    def allreduce(self, array):
        """Sum a float32 array over ranks in place.  MPICH combines the same
        pieces in the same order every time, and every rank receives the same bits."""
        self.comm.Allreduce(self.MPI.IN_PLACE, array, op=self.MPI.SUM)

    def any(self, flag):
        buf = np.array([int(bool(flag))], dtype=np.int32)
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.MAX)
        return bool(buf[0])

    def agree(self, error):
        """Buffers only, never pickles: which ranks failed, then the first one's message."""
        kinds = error_kinds()
        failed = np.zeros(self.size, dtype=np.int32)
        index = -1 if error is None else next(
            (i for i, k in enumerate(kinds) if isinstance(error, k)), len(kinds) - 1)
        mine = np.array([index], dtype=np.int32)
        self.comm.Allgather(mine, failed)
        culprits = np.flatnonzero(failed >= 0)
        if culprits.size == 0:
            return
        first = int(culprits[0])
        message = np.zeros(MESSAGE_BYTES, dtype=np.uint8)
        if self.rank == first:
            encoded = str(error).encode()[:MESSAGE_BYTES]
            message[:len(encoded)] = np.frombuffer(encoded, dtype=np.uint8)
        self.comm.Bcast(message, root=first)
        text = message.tobytes().rstrip(b"\0").decode(errors="replace")
        raise kinds[failed[first]](f"rank {first}: {text}")

    def abort(self, code):
        """A rank that cannot go on takes the whole job down: no rank hangs."""
        self.comm.Abort(code)

    def identical(self, digest):
        """Whether every rank holds the same digest (bytes of one length)."""
        mine = np.frombuffer(digest, dtype=np.uint8)
        everyone = np.zeros((self.size, mine.size), dtype=np.uint8)
        self.comm.Allgather(mine, everyone)
        return bool((everyone == everyone[0]).all())


def unlink_mpich_segments(node):
    """MPICH's own /dev/shm segments survive a killed rank.  Like ours, they can
    lose their names once every rank on the machine has them mapped."""
    node.Barrier()
    if node.Get_rank() == 0:
        try:
            with open("/proc/self/maps") as f:
                mapped = {line.split()[-1] for line in f if "/dev/shm/mpich_shm_" in line}
        except OSError:  # no /proc (macOS): MPICH's segments keep their names there
            mapped = set()
        for path in mapped:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    node.Barrier()


def make_group(backend):
    return MPIGroup() if backend == "mpi" else LocalGroup()
