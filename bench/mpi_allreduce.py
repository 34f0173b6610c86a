"""Cost of one all-reduce of GPT-2 124M's gradients (float32, the full parameter
arena) between MPI ranks, as the MPI backend does it once per step.

    mpiexec -n 2 python bench/mpi_allreduce.py [--model gpt2] [--repeats 7]
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

from trainer.models.gpt2 import VOCAB as GPT2_VOCAB, PRESETS, GPTConfig
from trainer.models import param_layout  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2", choices=list(PRESETS))
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    comm = MPI.COMM_WORLD
    size = param_layout(GPTConfig(**PRESETS[args.model], vocab_size=GPT2_VOCAB)).size
    grads = np.full(size, comm.Get_rank() + 1, dtype=np.float32)
    times = []
    for _ in range(args.repeats + 1):
        comm.Barrier()
        t0 = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, grads, op=MPI.SUM)
        times.append(time.perf_counter() - t0)
    if comm.Get_rank() == 0:
        t = statistics.median(times[1:])
        print(f"{args.model}: all-reduce of {size:,} floats ({4 * size / 1e6:.0f} MB) over "
              f"{comm.Get_size()} ranks: median {1000 * t:.0f} ms "
              f"({4 * size / t / 1e9:.2f} GB/s algorithm bandwidth; raw ms: "
              + " ".join(f"{1000 * x:.0f}" for x in times[1:]) + ")")


if __name__ == "__main__":
    main()
