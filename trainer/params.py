"""The parameter arena's layout: every tensor is a named view into one flat float32
buffer, each starting on a 64-byte boundary; and the optimizer's shards of it.
Which tensors there are is the model family's to say (trainer/models)."""
import numpy as np

ALIGN = 16  # floats: tensors start on 64-byte boundaries


class Layout:
    """Offsets of named tensors inside one flat float32 buffer."""

    def __init__(self, shapes):
        self.shapes = dict(shapes)
        self.offsets = {}
        offset = 0
        for name, shape in shapes:
            self.offsets[name] = offset
            offset += -(-int(np.prod(shape)) // ALIGN) * ALIGN
        self.size = offset  # floats

    def views(self, flat):
        assert flat.size >= self.size
        return {name: flat[o:o + int(np.prod(self.shapes[name]))].reshape(self.shapes[name])
                for name, o in self.offsets.items()}

    def allocate(self):
        flat = np.zeros(self.size, dtype=np.float32)
        return flat, self.views(flat)


def shard_bounds(size, n_shards):
    """Contiguous, ALIGN-aligned [start, end) of each worker's optimizer shard."""
    step = -(-size // (n_shards * ALIGN)) * ALIGN
    return [(min(r * step, size), min((r + 1) * step, size)) for r in range(n_shards)]
