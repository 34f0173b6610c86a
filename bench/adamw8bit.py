"""The cost of 8-bit Adam moments: one AdamW update of every GPT-2 parameter, fp32
moments (trainer.optim.adamw_update) against 8-bit (trainer.adamw8bit.State8), in
this one process and thread (a pool's W workers each take 1/W of it), interleaved
rounds after one warm-up of each.

    python bench/adamw8bit.py [--model gpt2] [--rounds 5]

Prints the median and raw seconds of each, and the bytes of optimizer state."""
import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

import harness  # puts the repository on sys.path
from trainer.adamw8bit import State8, side_layout  # noqa: E402
from trainer.gemm import Engine  # noqa: E402
from trainer.optim import BLOCK, Hyper, adamw_update  # noqa: E402
from trainer.models.gpt2 import VOCAB as GPT2_VOCAB, GPTConfig, PRESETS  # noqa: E402
from trainer.models import param_layout  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", choices=list(PRESETS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", help="where to write the result (default bench/results/)")
    args = p.parse_args()
    layout = param_layout(GPTConfig(**PRESETS[args.model], vocab_size=GPT2_VOCAB))
    n = layout.size
    rng = np.random.default_rng(0)
    params = rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)
    grads = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3)
    m, v, tmp = np.zeros(n, np.float32), np.zeros(n, np.float32), np.empty(BLOCK, np.float32)
    state = State8(layout, np.zeros(n, np.uint8), np.zeros(n, np.uint8), np.zeros(side_layout(layout).size, np.float32))
    engine = Engine("numpy")

    def hyper(t, shape):
        return Hyper(lr=1e-4, t=t, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1 if len(shape) == 2 else 0.0)

    def fp32(t):
        for name, shape in layout.shapes.items():
            lo, hi = layout.offsets[name], layout.offsets[name] + int(np.prod(shape))
            adamw_update(params[lo:hi], grads[lo:hi], m[lo:hi], v[lo:hi], tmp, hyper(t, shape), engine=engine)

    def eight_bit(t):
        for name, shape in layout.shapes.items():
            lo, hi = layout.offsets[name], layout.offsets[name] + int(np.prod(shape))
            state.update(name, lo, hi, params[lo:hi], grads[lo:hi], None, hyper(t, shape), engine=engine)

    times = {"fp32 moments": [], "8-bit moments": []}
    with threadpool_limits(1):
        for t in range(args.rounds + 1):
            for (name, seconds), run in zip(times.items(), (fp32, eight_bit)):
                t0 = time.perf_counter()
                run(t + 1)
                if t:  # the first round touches every page
                    seconds.append(time.perf_counter() - t0)
    state_bytes = {"fp32 moments": 8 * n, "8-bit moments": 2 * n + 4 * side_layout(layout).size}
    print(f"{args.model}: {n:,} parameters, one AdamW update in one thread")
    for name, seconds in times.items():
        print(f"{name}: median {np.median(seconds):.3f} s (raw {' '.join(f'{s:.3f}' for s in seconds)}), "
              f"state {state_bytes[name] / 1e6:,.0f} MB")
    harness.save("adamw8bit", {"model": args.model, "parameters": n, "rounds": args.rounds, "threads": 1},
                 rows=[{"moments": name, "median_s": float(np.median(seconds)),
                        "raw_s": " ".join(f"{s:.3f}" for s in seconds), "state_mb": round(state_bytes[name] / 1e6)}
                       for name, seconds in times.items()], out=args.json)


if __name__ == "__main__":
    main()
