"""LoRA (Hu et al. 2021) as Hugging Face peft applies it:

    y = x W + b + (alpha / r) · dropout(x) A^T B^T,   A (r, in), B (out, r)

Only A and B train; the base weights are frozen (no gradient, no Adam state, no
weight-gradient GEMM).  This module holds the adapters' layout, their
initialisation (peft's: A kaiming-uniform with a = sqrt(5), i.e. U(±1/sqrt(in));
B zeros), their math at the model's matrix sites (`LoraSites`), the dropout masks
and the merge W + (alpha/r) ΔW.  Which layers it adapts, their fans and
orientation are the model family's table (its LORA_*, lora_fans, lora_delta);
LoRA's what-trains component is trainer/lora_training.py's, peft's files
trainer/peft.py's, the frozen base trainer/base.py's.
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


def lora_of(settings, family):
    """The Lora of the run's settings (lora_rank, lora_alpha, lora_targets,
    lora_dropout) on a model of `family` (its config's module), or None."""
    if not settings.lora_rank:
        return None
    return Lora(settings.lora_rank,
                float(settings.lora_alpha if settings.lora_alpha is not None else settings.lora_rank),
                parse_targets(settings.lora_targets or family.LORA_DEFAULT, family),
                float(settings.lora_dropout or 0.0), settings.seed)


def checked_settings(rank, alpha, targets, dropout, family):
    """--lora-rank … --lora-dropout as given (None: not given) -> {setting: value}
    with LoRA's derived ones filled (alpha = r, the family's default targets,
    dropout 0), {} without LoRA.  Raises ValueError naming a bad one."""
    given = [f"--lora-{k}" for k, v in (("alpha", alpha), ("targets", targets), ("dropout", dropout))
             if v is not None]
    if rank < 0 or (rank == 0 and given):
        raise ValueError(f"--lora-rank must be a positive integer for {' '.join(given)}, got {rank}"
                         if given else f"--lora-rank must not be negative, got {rank}")
    if rank == 0:
        return {}
    alpha, dropout = float(rank if alpha is None else alpha), float(dropout or 0.0)
    if alpha <= 0:
        raise ValueError(f"--lora-alpha must be positive, got {alpha:g}")
    if not 0 <= dropout < 1:
        raise ValueError(f"--lora-dropout must be in [0, 1), got {dropout:g}")
    targets = targets or family.LORA_DEFAULT
    try:
        parse_targets(targets, family)
    except ValueError as e:
        raise ValueError(f"{e}; choose from {family.LORA_CHOICES}") from None
    return dict(lora_alpha=alpha, lora_targets=targets, lora_dropout=dropout)


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


def parameter_counts(cfg, lora):
    """peft's print_trainable_parameters line (all params: the base's and the adapters')."""
    trainable = trainable_count(cfg, lora)
    everything = trainable + sum(int(np.prod(shape)) for _, shape in cfg.family.param_shapes(cfg))
    return (f"trainable params: {trainable:,} || all params: {everything:,} || "
            f"trainable%: {100 * trainable / everything:.4f}")


class LoraSites:
    """The adapters at a model's matrix sites: the model calls forward after each
    frozen matmul, backward after each input-gradient matmul, and weights_backward
    for each of LoraTraining's tasks.  `model.MATRICES` (the family's) names each
    target's input activation and output gradient."""

    def __init__(self, model, lora, adapters):
        self.model, self.lora, self.dropping, self.buffers = model, lora, False, {}
        self.adapters = [{t: (adapters[f"{adapted(model.cfg, l, t)}.lora_A"],  # as matmuls read them
                              adapters[f"{adapted(model.cfg, l, t)}.lora_B"]) for t in lora.targets}
                         for l in range(model.cfg.n_layer)]

    def start(self, training):
        """A forward begins: dropout applies while training."""
        self.dropping = training and self.lora.dropout > 0

    def forward(self, l, target, out):
        """out (this worker's rows of the frozen layer's output) += s · x A^T B^T, if
        `target` has an adapter; out None: only u (for the backward's recompute)."""
        if target not in self.lora.targets:
            return
        model = self.model
        nn, acts, (a, b) = model.layers, model.acts, self.adapters[l][target]
        x = acts.matmul_mine[model.MATRICES[target].inp][l]  # made by the frozen layer's matmul
        if self.dropping:
            x = self.dropped(l, target, acts.mine[model.MATRICES[target].inp][l], model.first)
        nn.lora_down_forward(acts.mine["u." + target][l], x, a, self.lora.scale)
        u = acts.made_mine("u." + target, l)
        if out is not None:
            nn.lora_up_forward(out, u, b)

    def backward(self, l, target, dx, dout):
        """dx (this worker's rows of the frozen layer's input gradient) += du A,
        du = s · dout B.  -> whether it wrote dx."""
        if target not in self.lora.targets:
            return False
        model = self.model
        nn, acts, (a, b) = model.layers, model.acts, self.adapters[l][target]
        nn.lora_up_backward(acts.mine["du." + target][l], dout, b, self.lora.scale)
        du = acts.made_mine("du." + target, l)
        if self.dropping:
            mask = self.mask(l, target, model.first, dx.shape)
            nn.lora_down_backward_dropped(dx, du, a, mask, self.buffer("dropped", dx.shape))
        else:
            nn.lora_down_backward(dx, du, a)
        return True

    def weights_backward(self, task, grads):
        """A task's A and B gradients, from the rows of every worker (dropped as
        their forward dropped them)."""
        model, l, target = self.model, task.layer, task.name
        full, low, matrix = model.acts.full, model.acts.matmul_inputs, model.MATRICES[target]
        width = full[matrix.dout].shape[-1]
        low_dout = low[matrix.dout][l + matrix.dout_layer].reshape(-1, width)
        if getattr(matrix, "columns", None):  # the layer's columns of a fused output (Llama's q, k, v)
            low_dout = low_dout[:, slice(*matrix.columns)]
        inp = low[matrix.inp][l]
        inp = inp.reshape(-1, inp.shape[-1])
        if self.dropping:
            inp = self.dropped(l, target, inp, 0)
        name = adapted(model.cfg, l, target)
        model.layers.lora_weights_backward(grads[name + ".lora_A"], grads[name + ".lora_B"],
                                           low["du." + target][l], low_dout, low["u." + target][l], inp)

    def buffer(self, name, shape, dtype=np.float32):
        """A scratch array, made on first use (dropout's)."""
        key = (name, tuple(shape), np.dtype(dtype))
        if key not in self.buffers:
            self.buffers[key] = np.empty(shape, dtype=dtype)
        return self.buffers[key]

    def mask(self, l, target, first, shape):
        """The dropout mask of token rows first… of the model's batch, for layer l's target."""
        mask = self.buffer("mask", shape)
        window, first_token = self.model.batch_key
        key = (self.lora.seed, window, l, self.model.cfg.family.LORA_TARGETS.index(target))
        dropout_mask(mask, self.lora.dropout, key, first_token + first)
        return mask

    def dropped(self, l, target, x, first):
        """dropout(x) of token rows first… (x fp32 or bf16), as matmuls read it."""
        out = self.buffer("dropped input", x.shape)
        np.multiply(x, self.mask(l, target, first, x.shape), out=out, dtype=np.float32)
        acts = self.model.acts
        if not acts.low:
            return out
        low = self.buffer("dropped input, bf16", x.shape, acts.low_dtype)
        self.model.layers.engine.to_low(low, out)
        return low
