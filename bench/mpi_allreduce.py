"""Cost of one all-reduce of GPT-2 124M's gradients (float32, the full parameter
arena) between MPI ranks, as the MPI backend does it once per step.

    mpiexec -n 2 python bench/mpi_allreduce.py [--model gpt2] [--repeats 7]
"""
import argparse
import statistics
import time

import numpy as np

import harness  # puts the repository on sys.path
from mpi4py import MPI  # noqa: E402

from trainer.models.gpt2 import VOCAB as GPT2_VOCAB, PRESETS, GPTConfig  # noqa: E402
from trainer.models import param_layout  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2", choices=list(PRESETS))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--json", help="where to write the result (default bench/results/)")
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
        harness.save("mpi_allreduce", {"model": args.model, "ranks": comm.Get_size(), "floats": size},
                     rows=[{"median_ms": 1000 * t, "gb_per_s": 4 * size / t / 1e9,
                            "raw_ms": " ".join(f"{1000 * x:.0f}" for x in times[1:])}], out=args.json)


if __name__ == "__main__":
    main()
