"""The built-in profiler: per-layer-type times and GFLOP/s inside a worker, the
memory-bound phases' GB/s, and this machine's peaks to read them against.

`TimedLayers(layers)` stands in for trainer.model.Layers where the model takes its
layer functions (`Model(..., layers=...)`), only while profiling is on, so the
normal path pays nothing."""
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_limits


class TimedLayers:
    """model.py's *_forward / *_backward functions, each timed into `seconds`."""

    def __init__(self, layers):
        self.engine = layers.engine
        names = [name for name in dir(layers)
                 if name.endswith(("_forward", "_backward")) and callable(getattr(layers, name))]
        self.seconds = {name: 0.0 for name in names}
        self.flops = {name: 0 for name in names}  # the products the engine counted inside each
        for name in names:
            setattr(self, name, self._timed(name, getattr(layers, name)))

    def _timed(self, name, fn):
        def timed(*args, **kwargs):
            t0, flops0 = time.perf_counter(), self.engine.flops
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
                self.flops[name] += self.engine.flops - flops0
        return timed


def layer_table(per_worker, steps):
    """per_worker: each worker's ({layer: seconds}, {layer: FLOPs}) -> text table of
    ms per step and GFLOP/s by layer type, averaged over workers."""
    seconds = {name: sum(w[0][name] for w in per_worker) for name in per_worker[0][0]}
    flops = {name: sum(w[1].get(name, 0) for w in per_worker) for name in seconds}
    names = sorted(seconds, key=lambda n: -seconds[n])
    total, width = sum(seconds.values()), max(map(len, names))
    lines = [f"{'layer':<{width}} {'ms/step':>9} {'share':>7} {'GFLOP/s':>8}"]
    for name in names:
        if seconds[name]:
            rate = f"{flops[name] / seconds[name] / 1e9:8.1f}" if flops[name] else ""
            lines.append(f"{name:<{width}} {1000 * seconds[name] / len(per_worker) / steps:9.1f} "
                         f"{seconds[name] / total:7.1%} {rate}".rstrip())
    gemm = sum(seconds[n] for n in names if flops[n])
    lines.append(f"{'all layers':<{width}} {1000 * total / len(per_worker) / steps:9.1f}"
                 + (f" {'':>7} {sum(flops.values()) / gemm / 1e9:8.1f} (of the layers that multiply)" if gemm else ""))
    return "\n".join(lines)


def phase_line(rows, update_bytes, workers):
    """rows: the profiled steps' {phase: ms}; update_bytes: what one optimizer step
    reads and writes over all workers -> the phases' median ms per step, with the
    update's GB/s a worker."""
    median = {phase: statistics.median(row[phase] for row in rows) for phase in rows[0]}
    parts = [f"{phase} {ms:.0f}" for phase, ms in median.items()]
    if median.get("update"):
        rate = update_bytes / workers / (median["update"] / 1000) / 1e9
        parts[list(median).index("update")] += f" ({rate:.1f} GB/s a worker)"
    return "phases, median ms a step: " + ", ".join(parts)


GEMM_SHAPE = (1024, 768, 3072)  # M, K, N: a GPT-2 MLP product
BANDWIDTH_FLOATS = 2 ** 24  # 64 MB an array: past most CPUs' caches
# what measure_peaks holds (fp32 operands, the three added arrays): the memory plan counts it
PEAKS_BYTES = 4 * (GEMM_SHAPE[0] * GEMM_SHAPE[1] + GEMM_SHAPE[1] * GEMM_SHAPE[2] + GEMM_SHAPE[0] * GEMM_SHAPE[2]
                   + 3 * BANDWIDTH_FLOATS)


def measure_peaks(engine, threads, seconds=0.2):
    """-> this machine's peaks with one worker's threads, measured now: the engine's
    GFLOP/s on GEMM_SHAPE in its precision, and the GB/s of adding two 64 MB arrays
    into a third (bytes read plus written; a plain copy's rate depends on whether the C
    library streams it past the caches, which the optimizer's passes do not)."""
    M, K, N = GEMM_SHAPE
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((M, K), dtype=np.float32), rng.standard_normal((K, N), dtype=np.float32)
    out = np.empty((M, N), dtype=np.float32)
    if engine.low:
        a, b = a.astype(engine.low_dtype), b.astype(engine.weight_dtype)
    x, y, z = (np.ones(BANDWIDTH_FLOATS, dtype=np.float32) for _ in range(3))
    with threadpool_limits(threads):
        return (2 * M * K * N * repeat(lambda: engine.matmul(out, a, b), seconds) / 1e9,
                3 * x.nbytes * repeat(lambda: np.add(x, y, out=z), seconds) / 1e9)


def repeat(fn, seconds):
    """-> how many times a second fn runs, after one warm-up run."""
    fn()
    runs, t0 = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - t0 < seconds:
        fn()
        runs += 1
    return runs / (time.perf_counter() - t0)


def clock(seconds):
    """12.3 -> '0:12'; 3725 -> '1:02:05'"""
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"
