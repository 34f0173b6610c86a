"""The activation table: every activation of one forward/backward pass, by name, in
one arena (llm.c's ActivationTensors), seen four ways:

    full      fp32, the rows of every worker sharing the arena
    mine      fp32, this worker's rows (a contiguous 1/n_parts of the token rows,
              uneven by one when they do not divide)
    low_full  bf16 copies of what matmuls read, every worker's rows (bf16 only)
    low_mine  ... this worker's rows, which it converts (`made`) before a matmul reads them

Alone (one process, or data parallelism) full and mine are the same rows.  In bf16
the activations only matmuls read (LOW_ONLY) keep their fp32 rows in a one-layer
private scratch: the bf16 copy is all that must outlive the layer.

A layer's weight gradients run as soon as its backward is done (the model), so the
activations' gradients keep one layer's room, seen as every layer's (layer stride
0); dresidual keeps two layers in turn (those weight gradients read dresidual[l+1]
after dresidual[l] is written).  With recompute (activation checkpointing) so does
every other per-layer activation but the blocks' inputs (residual): the backward
refills them by running the block's forward again.
"""
from typing import NamedTuple

import numpy as np

from trainer.errors import knob
from trainer.params import Layout


# rows of logits at a time: the lm head never holds all N x V of them (the model's head).
# 256 rows, fewer where the vocabulary is larger than GPT-2's (whose 256 rows are 51 MB,
# and Llama 3's 128K would be 131 MB); COREGPT_HEAD_ROWS changes it (the tests shrink it
# so that a small batch already spans several chunks).
HEAD_ROWS, HEAD_FLOATS = 256, 256 * 50304  # GPT-2 (padded or not): 256


def head_rows(N, n_parts, vocab):
    """Rows of the logits' chunk: about HEAD_ROWS (HEAD_FLOATS of logits at most), a
    multiple of the n_parts workers sharing them, at most N."""
    rows = knob("COREGPT_HEAD_ROWS", min(HEAD_ROWS, HEAD_FLOATS // vocab))
    return min(N, n_parts * max(1, rows // n_parts))


class Table(NamedTuple):
    """What an activation table holds: the activations of the model `cfg` (its
    family's spec) and of what trains (`trains`, trainer/trainable.py: LoRA adds
    its own), for B batch rows of T tokens shared by n_parts workers; training: with
    the gradients; recompute: see above."""
    cfg: object
    trains: object
    B: int
    T: int
    training: bool
    recompute: bool = False
    n_parts: int = 1


def activation_shapes(table):
    """[(name, shape, row axis)] of every activation of the table (see the family's
    activation_shapes), what trains adds last."""
    cfg, B, T = table.cfg, table.B, table.T
    return (cfg.family.activation_shapes(cfg, B, T, table.training, head_rows(B * T, table.n_parts, cfg.vocab_size))
            + table.trains.activation_shapes(B, T, table.training))


def low_copy(table, name):
    return name in table.cfg.family.LOW_COPIES or name in table.trains.LOW_COPIES


def low_only(table, name):
    return name in table.cfg.family.LOW_ONLY or name in table.trains.LOW_ONLY


def stored_layers(table, name, layers):
    """How many of an activation's `layers` are stored (see above)."""
    spec = table.cfg.family
    if name == spec.RESIDUAL_GRADIENT:
        return 2
    gradient = name in spec.GRADIENTS or name in table.trains.GRADIENTS
    return 1 if gradient or (table.recompute and name != spec.RESIDUAL) else layers


def stored(table, shapes):
    """shapes as stored (see stored_layers)."""
    return [(name, (stored_layers(table, name, shape[0]),) + shape[1:] if axis == 1 else shape, axis)
            for name, shape, axis in shapes]


def low_shapes(table):
    return stored(table, [shape for shape in activation_shapes(table) if low_copy(table, shape[0])])


def low_layout(table):
    """The layout of the bf16 copies' arena."""
    return Layout([(name, shape) for name, shape, _ in low_shapes(table)])


def shared_shapes(table, low):
    """The activations that live in the fp32 arena, as stored."""
    return stored(table, [shape for shape in activation_shapes(table) if not (low and low_only(table, shape[0]))])


def activation_layout(table, low=False):
    return Layout([(name, shape) for name, shape, _ in shared_shapes(table, low)])


class Turns:
    """k stored layers seen as `layers`: layer l is stored in l mod k."""

    def __init__(self, stored, layers):
        self.stored, self.shape = stored, (layers,) + stored.shape[1:]

    def __getitem__(self, index):
        layer, *rest = index if isinstance(index, tuple) else (index,)
        return self.stored[(layer % self.stored.shape[0], *rest)]


def every_layer(array, layers):
    """An activation as stored (k layers first) -> seen as all `layers` of it."""
    if array.shape[0] == layers:
        return array
    if array.shape[0] == 1:
        return np.lib.stride_tricks.as_strided(array, shape=(layers,) + array.shape[1:],
                                               strides=(0,) + array.strides[1:])
    return Turns(array, layers)


def share(n, part, n_parts):
    """Worker `part`'s rows lo…hi of n: a contiguous 1/n_parts (uneven by at most one)."""
    return n * part // n_parts, n * (part + 1) // n_parts


def rows_of(full, axis, part, n_parts):
    """The view of worker `part`'s rows of `axis` (see share)."""
    lo, hi = share(full.shape[axis], part, n_parts)
    return full[(slice(None),) * axis + (slice(lo, hi),)]


def one_layer_scratch(shape, axis, part, n_parts):
    """A private buffer of one layer's rows of this worker, seen as every layer's:
    the fp32 side of a LOW_ONLY activation."""
    rows = list(shape)
    lo, hi = share(rows[axis], part, n_parts)
    rows[axis] = hi - lo
    if axis == 0:
        return np.zeros(rows, dtype=np.float32)
    return every_layer(np.zeros([1] + rows[1:], dtype=np.float32), rows[0])


class Views(dict):
    """name -> array, also as attributes: `mine.ln1[l]`."""
    __getattr__ = dict.__getitem__


def views_of(arena, shapes, layers, part, n_parts):
    """-> (full, mine) Views of the activations `shapes` (as stored) in `arena`."""
    full = Layout([(name, shape) for name, shape, _ in shapes]).views(arena)
    mine = {name: rows_of(full[name], axis, part, n_parts) for name, _, axis in shapes}
    seen = lambda views: Views({name: every_layer(views[name], layers[name]) if axis == 1 else views[name]  # noqa: E731
                                for name, _, axis in shapes})
    return seen(full), seen(mine)


class Activations:
    """The activations of `table` (a Table), of whose token rows worker `part` owns a
    contiguous 1/n_parts.  `arena` and `low_arena` (shared memory in a pool) are
    allocated here when not given; low_dtype turns on the bf16 copies, which
    `engine` (trainer.gemm.Engine) makes."""
    past = 0  # positions before the first row, read from a KV cache (KVCache's rows)

    def __init__(self, table, engine, *, low_dtype=None, arena=None, low_arena=None, part=0):
        rows, T, n_parts = table.B, table.T, table.n_parts
        self.rows, self.part, self.n_parts, self.recompute = rows, part, n_parts, table.recompute
        self.engine = engine
        self.tokens = share(rows * T, part, n_parts)  # this worker's token rows lo…hi
        self.low, self.low_dtype = low_dtype is not None, low_dtype
        layers = {name: shape[0] for name, shape, _ in activation_shapes(table)}
        shapes = shared_shapes(table, self.low)
        if arena is None:
            arena = np.zeros(activation_layout(table, self.low).size, dtype=np.float32)
        self.full, self.mine = views_of(arena, shapes, layers, part, n_parts)
        self.low_full = self.low_mine = None
        if self.low:
            lows = low_shapes(table)
            if low_arena is None:
                low_arena = np.zeros(low_layout(table).size, dtype=low_dtype)
            self.low_full, self.low_mine = views_of(low_arena, lows, layers, part, n_parts)
            self.mine.update({name: one_layer_scratch((layers[name],) + shape[1:] if axis == 1 else shape,
                                                      axis, part, n_parts)
                              for name, shape, axis in lows if low_only(table, name)})
        # what matmuls read: the bf16 copies, or the fp32 rows themselves
        self.matmul_inputs = self.low_full if self.low else self.full
        self.matmul_mine = self.low_mine if self.low else self.mine

    def made(self, name, *index):
        """This worker's rows of `name`[index] are final: make their bf16 copy.
        -> every worker's rows, as matmuls read them."""
        if self.low:
            self.engine.to_low(self.low_mine[name][index], self.mine[name][index])
        return self.matmul_inputs[name][index]

    def made_mine(self, name, *index):
        """As made -> this worker's rows only, as matmuls read them."""
        if self.low:
            self.engine.to_low(self.low_mine[name][index], self.mine[name][index])
        return self.matmul_mine[name][index]

    def made_first(self, name, rows):
        """As made, for the first `rows` rows of `name` (a chunk's): this worker's
        share of them is final."""
        if self.low:
            self.engine.to_low(rows_of(self.low_full[name][:rows], 0, self.part, self.n_parts),
                               rows_of(self.full[name][:rows], 0, self.part, self.n_parts))
        return self.matmul_inputs[name][:rows]


class CachedRows(Activations):
    """KVCache.at's table: fp32 views it is given, one worker's (no bf16 copies)."""

    def __init__(self, views, past, n, engine):
        self.rows, self.part, self.n_parts, self.recompute, self.engine = 1, 0, 1, False, engine
        self.past, self.tokens = past, (0, n)
        self.low, self.low_dtype, self.low_full, self.low_mine = False, None, None, None
        self.full = self.mine = self.matmul_inputs = self.matmul_mine = views


class KVCache:
    """The activations of one sequence sampled a few positions at a time: the
    family's CACHED activation (GPT-2's qkv: keys and values) of every layer and
    every position so far, and for the rest one layer's room (two for the blocks'
    inputs) of the positions of one call.  `table` is the evaluation Table of one
    row of the model's context; at(start, n) -> the rows of positions start…start+n−1."""

    def __init__(self, table, engine):
        self.table, self.engine = table, engine
        spec = table.cfg.family
        self.buffers = {name: np.zeros(shape if name == spec.CACHED else
                                       (min(shape[0], 2) if name == spec.RESIDUAL else 1,) + shape[1:]
                                       if axis == 1 else shape, dtype=np.float32)
                        for name, shape, axis in activation_shapes(table)}

    def at(self, start, n):
        table = self.table._replace(T=n)
        spec, views = table.cfg.family, Views()
        for name, shape, axis in activation_shapes(table):
            buffer = self.buffers[name]
            if name == spec.CACHED:
                views[name] = buffer[:, :start + n]
                continue
            stored = (buffer.shape[0],) + shape[1:] if axis == 1 else shape
            view = buffer.reshape(-1)[:int(np.prod(stored))].reshape(stored)
            views[name] = every_layer(view, shape[0]) if axis == 1 else view
        return CachedRows(views, start, n, self.engine)
