"""A barrier between the workers of one pool, made of pipes.

Worker s tells worker r it has arrived by writing one byte into the pipe s→r,
then waits for one byte from every other worker.  One pipe per ordered pair
keeps successive barriers apart.  A reader polls for SPIN_S, then sleeps in
select(), so oversubscribed cores are not burned for long: a crossing where
both arrive together costs a few µs, one that has to wake a sleeper ~15 µs.
The write ends live only in their writer, so a worker that dies closes its
pipes and the others read end-of-file instead of waiting forever.
"""
import os
import select
import time

SPIN_S = 100e-6  # poll this long before sleeping: waking a sleeping process costs more


class PeerGone(RuntimeError):
    """Another worker of the pool died; the coordinator reports that one's fate."""


def make_pipes(n_workers):
    """-> per worker {"read": [fd], "write": [fd]} (empty for one worker) and every fd,
    which the coordinator closes once the workers have inherited theirs."""
    ends = [{"read": [], "write": []} for _ in range(n_workers)]
    fds = []
    try:
        for s in range(n_workers):
            for r in range(n_workers):
                if s != r:
                    read, write = os.pipe()
                    fds += [read, write]
                    ends[r]["read"].append(read)
                    ends[s]["write"].append(write)
    except OSError:
        close_all(fds)
        raise
    return ends, fds


def close_all(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class PipeBarrier:
    def __init__(self, ends):
        self.read, self.write = ends["read"], ends["write"]
        for fd in self.read:
            os.set_blocking(fd, False)
        self.seconds = 0.0  # time spent waiting here, for the profiler

    def __call__(self):
        if not self.read:
            return
        t0 = time.perf_counter()
        try:
            for fd in self.write:
                os.write(fd, b"\0")
            spin_until = t0 + SPIN_S
            for fd in self.read:
                while True:
                    try:
                        if os.read(fd, 1):
                            break
                        raise BrokenPipeError  # end of file: the writer is gone
                    except BlockingIOError:
                        if time.perf_counter() > spin_until:
                            select.select([fd], [], [])
        except BrokenPipeError:
            raise PeerGone("another worker of this pool is gone") from None
        self.seconds += time.perf_counter() - t0


class PipeProgress:
    """The same pipes used as counters: a worker announces each gradient bucket it
    has finished with one byte to every peer, and (when buffers are staged) each
    bucket it has reduced with another; `finished()` and `reduced()` are the numbers
    every peer has announced.  (Data parallelism uses this, never the barrier.)"""
    FINISHED, REDUCED = 1, 2  # the bytes

    def __init__(self, ends):
        self.read, self.write = ends["read"], ends["write"]
        for fd in self.read:
            os.set_blocking(fd, False)
        self.seen = [[0, 0] for _ in self.read]  # per peer: finished, reduced

    def announce(self, reduced=False):
        try:
            for fd in self.write:
                os.write(fd, bytes([self.REDUCED if reduced else self.FINISHED]))
        except BrokenPipeError:  # the reader is dead
            raise PeerGone("another worker of this pool is gone") from None

    def counts(self, kind):
        for i, fd in enumerate(self.read):
            while True:
                try:
                    got = os.read(fd, 4096)
                except BlockingIOError:
                    break
                if not got:
                    raise PeerGone("another worker of this pool is gone")
                self.seen[i][0] += got.count(self.FINISHED)
                self.seen[i][1] += got.count(self.REDUCED)
        return min((seen[kind] for seen in self.seen), default=1 << 62)

    def finished(self):
        return self.counts(0)

    def reduced(self):
        return self.counts(1)

    def wait(self):
        """Sleep until some peer announces something."""
        select.select(self.read, [], [], 0.05)
