"""One attention layer, forward and backward, under each GEMM engine, against
PyTorch's float64 causal SDPA (needs the [test] extra for torch):

    python bench/attention.py [--batch-size 1] [--seq-len 1024] [--rounds 3]

Prints each engine's median ms (one thread) and its largest error relative to the
float64 output and q, k, v gradients.  Run it in a worktree of an older commit for
the figures before a change.
"""
import argparse
import time

import numpy as np

import harness  # puts the repository on sys.path
from trainer import attention, gemm  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="where to write the result (default bench/results/)")
    args = ap.parse_args()
    import torch
    from threadpoolctl import threadpool_limits
    B, T, NH, C = args.batch_size, args.seq_len, 12, 768
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((B, T, 3 * C), dtype=np.float32)
    dout = rng.standard_normal((B, T, C), dtype=np.float32)
    exact = torch.tensor(qkv, dtype=torch.float64, requires_grad=True)
    q, k, v = (x.view(B, T, NH, C // NH).transpose(1, 2) for x in exact.split(C, dim=2))
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
    y.backward(torch.tensor(dout, dtype=torch.float64))
    exact_out, exact_grad = y.detach().numpy(), exact.grad.numpy()

    def median_ms(fn):
        fn()
        times = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e3 * float(np.median(times))
    print(f"attention, B={B}, T={T}, 12 heads of 64, one thread")
    engines = ["numpy"] + ([] if gemm.onednn_library() is None else ["onednn", gemm.choose("bf16")[0]])
    rows = []
    with threadpool_limits(1):
        for name in engines:
            work = attention.Workspace(gemm.Engine(name))
            out, lse, dqkv = np.zeros((B, T, C), np.float32), np.zeros((B, NH, T), np.float32), np.zeros_like(qkv)
            forward = median_ms(lambda: attention.attention_forward(work, out, lse, qkv, NH))
            backward = median_ms(lambda: attention.attention_backward(work, dqkv, dout, qkv, out, lse, NH))
            errors = [np.abs(ours - want).max() / np.abs(want).max()
                      for ours, want in ((out, exact_out), (dqkv, exact_grad))]
            print(f"{name:14} forward {forward:7.1f} ms  backward {backward:7.1f} ms  "
                  f"error: output {errors[0]:.1e}, gradients {errors[1]:.1e}")
            rows.append({"engine": name, "forward_ms": forward, "backward_ms": backward,
                         "output_error": float(errors[0]), "gradient_error": float(errors[1])})
    harness.save("attention", {"batch_size": B, "seq_len": T, "heads": NH, "rounds": args.rounds}, rows=rows,
                 out=args.json)


if __name__ == "__main__":
    main()
