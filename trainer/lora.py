"""LoRA (Hu et al. 2021) as Hugging Face peft applies it:

    y = x W + b + (alpha / r) · dropout(x) A^T B^T,   A (r, in), B (out, r)

Only A and B train; the base weights are frozen (no gradient, no Adam state, no
weight-gradient GEMM).  This module owns the adapters' layout, their
initialisation (peft's: A kaiming-uniform with a = sqrt(5), i.e. U(±1/sqrt(in));
B zeros), the dropout masks and the merge W + (alpha/r) ΔW; which layers it
adapts, their fans and orientation are the model family's table (its LORA_*,
lora_fans, lora_delta); peft's files are trainer/peft.py's.
"""
from typing import NamedTuple

import numpy as np

from trainer.errors import WeightsError
from trainer.params import Layout


class Lora(NamedTuple):
    rank: int
    alpha: float
    targets: tuple  # a subset of TARGETS, in TARGETS order
    dropout: float = 0.0
    seed: int = 0  # of the dropout masks

    @property
    def scale(self):
        return self.alpha / self.rank


def parse_targets(text, family):
    """'c_attn,mlp.c_fc' -> targets in the order of the family's LORA_TARGETS; raises
    ValueError naming an unknown one."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in family.LORA_ALIASES]
    if unknown or not names:
        raise ValueError(f"--lora-targets: unknown target {unknown[0]!r}" if unknown else
                         "--lora-targets names no target")
    chosen = {family.LORA_ALIASES[t] for t in names}
    return tuple(t for t in family.LORA_TARGETS if t in chosen)


def lora_of(s, family):
    """The Lora of settings `s` (lora_rank, lora_alpha, lora_targets, lora_dropout) on
    a model of `family` (its config's module), or None."""
    if not s.lora_rank:
        return None
    return Lora(s.lora_rank, float(s.lora_alpha if s.lora_alpha is not None else s.lora_rank),
                parse_targets(s.lora_targets or family.LORA_DEFAULT, family), float(s.lora_dropout or 0.0),
                s.seed)


MASK_ROWS = 64  # token rows per dropout draw: a row's mask is the same however the batch is split


def dropout_mask(out, p, key, first_row):
    """out (n, in) = the dropout mask of token rows first_row…first_row+n (global
    rows of the step's batch): 1/(1-p) where kept (probability 1 - p), else 0.  Each
    block of MASK_ROWS rows has its own stream, from key (seed, micro-batch,
    layer, target), so any worker draws the same mask for a row."""
    n, width = out.shape
    row = first_row
    while row < first_row + n:
        block, skip = divmod(row, MASK_ROWS)
        take = min(MASK_ROWS - skip, first_row + n - row)
        draw = np.random.default_rng([*key, block]).random((MASK_ROWS, width), dtype=np.float32)[skip:skip + take]
        np.greater_equal(draw, np.float32(p), out=out[row - first_row:row - first_row + take])
        row += take
    out *= np.float32(1 / (1 - p))


def adapted(cfg, layer, target):
    """The adapters' name stem: the adapted weight's name less '.weight'."""
    return cfg.family.target_weight(layer, target).removesuffix(".weight")


def adapter_shapes(cfg, lora):
    """[(name, shape)] of the trainable tensors, in layer order: {adapted}.lora_A (r, in)
    and .lora_B (out, r), peft's shapes."""
    shapes = []
    for l in range(cfg.n_layer):
        for target in lora.targets:
            fan_in, fan_out = cfg.family.lora_fans(cfg, target)
            shapes += [(f"{adapted(cfg, l, target)}.lora_A", (lora.rank, fan_in)),
                       (f"{adapted(cfg, l, target)}.lora_B", (fan_out, lora.rank))]
    return shapes


def adapter_layout(cfg, lora):
    return Layout(adapter_shapes(cfg, lora))


def base_layout(cfg, lora, low):
    """The layout of the fp32 parameter arena: every parameter; but with LoRA in bf16
    the frozen block matrices are held only as their bf16 copy (they never change and
    matmuls read only the copy), so the arena keeps the rest (embeddings, biases,
    layernorms)."""
    shapes = cfg.family.param_shapes(cfg)
    if lora is not None and low:
        shapes = [(name, shape) for name, shape in shapes if not cfg.family.block_matrix(name)]
    return Layout(shapes)


def trainable_layout(cfg, lora):
    """What gradients, Adam state and the optimizer's shards cover: every parameter,
    or with LoRA the adapters."""
    return Layout(cfg.family.param_shapes(cfg)) if lora is None else adapter_layout(cfg, lora)


def trainable_count(cfg, lora):
    return sum(int(np.prod(shape)) for _, shape in adapter_shapes(cfg, lora))


def init_adapters(cfg, lora, views, seed):
    """peft's init from the run's seed: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform_
    with a = sqrt(5)), B = 0, so the adapted model starts equal to its base."""
    rng = np.random.default_rng([seed, 0x10A])
    for name, view in views.items():
        if name.endswith("lora_A"):
            bound = 1.0 / np.sqrt(view.shape[1])
            view[...] = rng.uniform(-bound, bound, view.shape).astype(np.float32)
        else:
            view[...] = 0.0


def merged(cfg, lora, base, adapters):
    """{name: array} of the base weights with every adapter merged in,
    W + (alpha/r) ΔW (the family's lora_delta of A and B), computed in float64 and
    rounded once."""
    out = dict(base)
    for l in range(cfg.n_layer):
        for target in lora.targets:
            stem, weight = adapted(cfg, l, target), cfg.family.target_weight(l, target)
            a, b = (adapters[f"{stem}.lora_{k}"].astype(np.float64) for k in "AB")
            out[weight] = (base[weight] + lora.scale * cfg.family.lora_delta(a, b)).astype(np.float32)
    return out


def check_adapters(cfg, lora, tensors, source):
    """Every adapter tensor present with the shape the base model implies."""
    for name, shape in adapter_shapes(cfg, lora):
        if name not in tensors:
            raise WeightsError(f"{source}: tensor {name} is missing (does the adapter belong to this base?)")
        if tuple(tensors[name].shape) != shape:
            raise WeightsError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, expected "
                               f"{shape} for this base model")
    extra = sorted(set(tensors) - {name for name, _ in adapter_shapes(cfg, lora)})
    if extra:
        raise WeightsError(f"{source}: tensor {extra[0]} is not in a {cfg.n_layer}-layer model")
