"""The built-in profiler: per-layer-type times inside a worker, and the
per-step phase split the coordinator logs.

`TimedLayers(layers)` stands in for trainer.model.Layers where the model takes its
layer functions (`Model(..., layers=...)`), only while profiling is on, so the
normal path pays nothing."""
import time


class TimedLayers:
    """model.py's *_forward / *_backward functions, each timed into `seconds`."""

    def __init__(self, layers):
        self.engine = layers.engine
        names = [name for name in dir(layers)
                 if name.endswith(("_forward", "_backward")) and callable(getattr(layers, name))]
        self.seconds = {name: 0.0 for name in names}
        for name in names:
            setattr(self, name, self._timed(name, getattr(layers, name)))

    def _timed(self, name, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
        return timed


def layer_table(per_worker, steps):
    """Text table of ms per step by layer type, averaged over workers."""
    names = sorted(per_worker[0], key=lambda n: -sum(w[n] for w in per_worker))
    total = sum(sum(w.values()) for w in per_worker) / len(per_worker)
    width = max(map(len, names))
    lines = [f"{'layer':<{width}} {'ms/step':>9} {'share':>7}"]
    for name in names:
        ms = sum(w[name] for w in per_worker) / len(per_worker)
        if ms:
            lines.append(f"{name:<{width}} {1000 * ms / steps:9.1f} {ms / total:7.1%}")
    lines.append(f"{'all layers':<{width}} {1000 * total / steps:9.1f}")
    return "\n".join(lines)


def clock(seconds):
    """12.3 -> '0:12'; 3725 -> '1:02:05'"""
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"
