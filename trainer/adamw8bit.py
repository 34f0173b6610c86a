"""8-bit AdamW: Adam's moments kept as bitsandbytes' AdamW8bit keeps them on the CPU.

Each tensor of at least MIN_ELEMENTS elements keeps m and v as one byte per
element: blocks of QBLOCK elements share an fp32 absmax (the block's max |x|),
and each element is the index of the nearest value of x / absmax in a 256-entry
dynamic map (Dettmers' dynamic data type: signed for m, unsigned for v).  Smaller
tensors keep fp32 moments.  A step dequantises a chunk, applies the fp32 AdamW
update of optim.py to it, and quantises it back, so the update rule, the bias
correction and the decoupled decay are exactly those of `--optim adamw`.

The quantiser is bitsandbytes' CPU one, value for value: x / absmax is put into
one of 65,536 buckets over [-1, 1] (floor((y + 1) · 32767.5 + 0.5) in float32),
and each bucket holds the code nearest its own point, b / 32767.5 − 1.  (That is
nearest rounding wherever the codes are further apart than a bucket, 3e-5; below
that, near zero, it is the bucket's code.)  tests/test_adamw8bit.py checks the maps
and the quantiser against bitsandbytes.
"""
import numpy as np

from trainer.optim import adamw_update
from trainer.params import Layout

QBLOCK = 256  # elements sharing one absmax
MIN_ELEMENTS = 4096  # smaller tensors keep fp32 moments (bitsandbytes' min_8bit_size)
CHUNK = 64 * QBLOCK  # elements dequantised, updated and quantised back at a time (in L2)
GRID = np.float32(32767.5)  # half the buckets of the quantiser's lookup table


def linspace32(start, end, steps):
    """torch.linspace(start, end, steps) in float32, value for value: its kernel
    rounds start + step·i once (a fused multiply-add) and counts the upper half
    down from end."""
    start, end = np.float32(start), np.float32(end)
    step = np.float32((end - start) / np.float32(steps - 1))
    i = np.arange(steps)
    up = (np.float64(start) + np.float64(step) * i).astype(np.float32)
    down = (np.float64(end) - np.float64(step) * (steps - 1 - i)).astype(np.float32)
    return np.where(i < steps // 2, up, down)


def dynamic_map(signed):
    """bitsandbytes' create_dynamic_map(signed, max_exponent_bits=7, total_bits=8):
    for each exponent 10^-6 … 10^0, the midpoints of an even grid on [0.1, 1], that
    grid twice as fine when unsigned; plus 0 and 1; sorted, float32."""
    values = [np.float32([0, 1])]
    for i in range(7):
        grid = linspace32(0.1, 1, 2 ** (i + (0 if signed else 1)) + 1)
        means = (grid[:-1] + grid[1:]) / np.float32(2)
        values.append(np.float32(10.0 ** (i - 6)) * means)
        if signed:
            values.append(np.float32(-(10.0 ** (i - 6))) * means)
    return np.sort(np.concatenate(values)).astype(np.float32)


class Codebook:
    """One dynamic map and its quantiser's lookup table (see above)."""

    def __init__(self, code):
        self.code = code
        point = np.arange(2 * int(GRID) + 2, dtype=np.float32) / GRID - np.float32(1)
        left = np.clip(np.searchsorted(code, point, side="right") - 1, 0, code.size - 1)
        right = np.minimum(left + 1, code.size - 1)
        closer = np.abs(point - code[right]) < np.abs(point - code[left])  # a tie keeps the left
        self.table = np.where(closer, right, left).astype(np.uint8)
        self.zero = self.table[int(GRID + np.float32(0.5))]  # the code of 0

    def quantize(self, x, codes, absmax, normed, index):
        """x (n,) float32 -> codes (n,) uint8 and absmax (ceil(n / QBLOCK),); normed
        and index are float32 and int32 scratch of n.  Only the last block may be short."""
        whole = x.size // QBLOCK * QBLOCK
        blocks = [(x[:whole].reshape(-1, QBLOCK), normed[:whole].reshape(-1, QBLOCK), absmax[:whole // QBLOCK])]
        if whole < x.size:
            blocks.append((x[whole:].reshape(1, -1), normed[whole:].reshape(1, -1), absmax[whole // QBLOCK:]))
        for rows, out, top in blocks:
            np.abs(rows, out=out)
            np.max(out, axis=1, out=top)
            scale = np.where(top > 0, top, np.float32(1))  # an all-zero block: codes of 0, absmax 0
            np.divide(rows, scale[:, None], out=out)
        np.add(normed, np.float32(1), out=normed)
        np.multiply(normed, GRID, out=normed)
        np.add(normed, np.float32(0.5), out=normed)
        np.copyto(index, normed, casting="unsafe")  # truncation = floor: it is >= 0
        np.take(self.table, index, out=codes)

    def dequantize(self, codes, absmax, out):
        """codes (n,) uint8, absmax (ceil(n / QBLOCK),) -> out (n,) float32."""
        np.take(self.code, codes, out=out)
        whole = codes.size // QBLOCK * QBLOCK
        rows = out[:whole].reshape(-1, QBLOCK)
        rows *= absmax[:whole // QBLOCK, None]
        if whole < codes.size:
            out[whole:] *= absmax[-1]


SIGNED, UNSIGNED = Codebook(dynamic_map(True)), Codebook(dynamic_map(False))


def quantized(shape):
    return int(np.prod(shape)) >= MIN_ELEMENTS


def side_layout(layout):
    """The fp32 part of the 8-bit state of the parameters `layout`: each quantised
    tensor's absmax of m and v, and the fp32 moments of the small tensors."""
    shapes = []
    for name, shape in layout.shapes.items():
        if quantized(shape):
            blocks = -(-int(np.prod(shape)) // QBLOCK)
            shapes += [(f"m_absmax.{name}", (blocks,)), (f"v_absmax.{name}", (blocks,))]
        else:
            shapes += [(f"m.{name}", shape), (f"v.{name}", shape)]
    return Layout(shapes)


def block_bounds(layout, bounds):
    """Shard bounds [(start, end)] moved down to the start of their quantisation
    block, so that no block is split between two workers."""
    def snap(at):
        for name, shape in layout.shapes.items():
            first, size = layout.offsets[name], int(np.prod(shape))
            if first <= at < first + size:
                return first + (at - first) // QBLOCK * QBLOCK if quantized(shape) else at
        return at
    cuts = [snap(start) for start, _ in bounds] + [bounds[-1][1]]
    return list(zip(cuts, cuts[1:]))


class State8:
    """The 8-bit moments of a parameter layout: m and v codes (uint8 arrays laid out
    like the parameters) and the side arena (side_layout)."""

    def __init__(self, layout, m_codes, v_codes, side):
        self.layout = layout
        self.m_codes, self.v_codes = m_codes, v_codes
        self.side = side_layout(layout).views(side)
        self.scratch = [np.empty(CHUNK, dtype) for dtype in (np.float32, np.float32, np.float32, np.int32)]

    def views(self):
        """{prefix: {name: view}} of every tensor of the state, as checkpoints name them."""
        views = {"m.": {}, "v.": {}, "m_absmax.": {}, "v_absmax.": {}}
        codes = {"m.": self.layout.views(self.m_codes), "v.": self.layout.views(self.v_codes)}
        for name, shape in self.layout.shapes.items():
            for moment in ("m", "v"):
                if quantized(shape):
                    views[f"{moment}."][name] = codes[f"{moment}."][name]
                    views[f"{moment}_absmax."][name] = self.side[f"{moment}_absmax.{name}"]
                else:
                    views[f"{moment}."][name] = self.side[f"{moment}.{name}"]
        return views

    def update(self, name, lo, hi, p, g, p_low, hyper, *, engine):
        """AdamW (hyper: trainer.optim.Hyper, on `engine`) on elements lo…hi of
        parameter `name` (flat p, g and p_low are those elements); lo is a block
        start (block_bounds)."""
        shape, first = self.layout.shapes[name], self.layout.offsets[name]
        m_moment, v_moment, normed, index = self.scratch
        if not quantized(shape):
            m, v = (self.side[f"{k}.{name}"].reshape(-1)[lo - first:hi - first] for k in ("m", "v"))
            adamw_update(p, g, m, v, normed, hyper, engine=engine, p_low=p_low)
            return
        m_absmax, v_absmax = self.side[f"m_absmax.{name}"], self.side[f"v_absmax.{name}"]
        for s in range(lo, hi, CHUNK):
            e = min(s + CHUNK, hi)
            n, blocks = e - s, slice((s - first) // QBLOCK, -(-(e - first) // QBLOCK))
            here = slice(s - lo, e - lo)
            m, v = m_moment[:n], v_moment[:n]
            SIGNED.dequantize(self.m_codes[s:e], m_absmax[blocks], m)
            UNSIGNED.dequantize(self.v_codes[s:e], v_absmax[blocks], v)
            adamw_update(p[here], g[here], m, v, normed, hyper, engine=engine,
                         p_low=None if p_low is None else p_low[here])
            SIGNED.quantize(m, self.m_codes[s:e], m_absmax[blocks], normed[:n], index[:n])
            UNSIGNED.quantize(v, self.v_codes[s:e], v_absmax[blocks], normed[:n], index[:n])
