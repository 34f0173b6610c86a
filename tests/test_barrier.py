"""The pipe barrier between a pool's workers: nobody passes before all arrive, and a
dead worker turns the others' wait into an error instead of a hang."""
import mmap
import os
import time

import numpy as np

from workers.barrier import PeerGone, PipeBarrier, close_all, make_pipes

ROUNDS = 200


def run_members(n, body):
    """Fork n processes; member r keeps only its own pipe ends and runs body(r, barrier,
    counts) -> exit code.  -> the n exit codes."""
    ends, fds = make_pipes(n)
    shared = mmap.mmap(-1, 8 * n)
    counts = np.frombuffer(shared, dtype=np.int64, count=n)
    pids = []
    for r in range(n):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                close_all(set(fds) - set(ends[r]["read"] + ends[r]["write"]))
                code = body(r, PipeBarrier(ends[r]), counts)
            finally:
                os._exit(code)
        pids.append(pid)
    close_all(fds)
    codes = []
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        codes.append(os.waitstatus_to_exitcode(status))
    return codes


def test_no_member_passes_before_all_arrive():
    def body(r, barrier, counts):
        for k in range(1, ROUNDS + 1):
            if r == k % 3:
                time.sleep(0.0002)  # someone is always late, a different one each round
            counts[r] = k
            barrier()
            if counts.min() < k:
                return 3
        return 0
    assert run_members(3, body) == [0, 0, 0]


def test_a_dead_member_is_an_error_not_a_hang():
    def body(r, barrier, counts):
        if r == 1:
            return 0  # leaves without arriving: its pipe ends close with it
        try:
            barrier()
        except PeerGone:
            return 4
        return 0
    t0 = time.monotonic()
    assert run_members(3, body) == [4, 0, 4]
    assert time.monotonic() - t0 < 10
