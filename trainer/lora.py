"""LoRA (Hu et al. 2021) as Hugging Face peft applies it to GPT-2's Conv1D layers:

    y = x W + b + (alpha / r) · dropout(x) A^T B^T,   A (r, in), B (out, r)

Only A and B train; the base weights are frozen (no gradient, no Adam state, no
weight-gradient GEMM).  This module owns the adapters' layout, their
initialisation (peft's: A kaiming-uniform with a = sqrt(5), i.e. U(±1/sqrt(in));
B zeros), the names peft's files use, and the merge W + (alpha/r) A^T B^T.
"""
import json
import os
from typing import NamedTuple

import numpy as np

from trainer.errors import WeightsError
from trainer.params import Layout, param_layout, param_shapes

TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
DEFAULT_TARGETS = "c_attn"  # peft's default for GPT-2
# what --lora-targets accepts for each target: peft's module-name suffixes
ALIASES = {"c_attn": "attn.c_attn", "attn.c_attn": "attn.c_attn", "attn.c_proj": "attn.c_proj",
           "c_fc": "mlp.c_fc", "mlp.c_fc": "mlp.c_fc", "mlp.c_proj": "mlp.c_proj"}
PEFT_PREFIX = "base_model.model.transformer."


class Lora(NamedTuple):
    rank: int
    alpha: float
    targets: tuple  # a subset of TARGETS, in TARGETS order
    dropout: float = 0.0
    seed: int = 0  # of the dropout masks

    @property
    def scale(self):
        return self.alpha / self.rank


def parse_targets(text):
    """'c_attn,mlp.c_fc' -> targets in TARGETS order; raises ValueError naming an unknown one."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in ALIASES]
    if unknown or not names:
        raise ValueError(f"--lora-targets: unknown target {unknown[0]!r}" if unknown else
                         "--lora-targets names no target")
    chosen = {ALIASES[t] for t in names}
    return tuple(t for t in TARGETS if t in chosen)


def lora_of(s):
    """The Lora of settings `s` (lora_rank, lora_alpha, lora_targets, lora_dropout), or None."""
    if not s.lora_rank:
        return None
    return Lora(s.lora_rank, float(s.lora_alpha if s.lora_alpha is not None else s.lora_rank),
                parse_targets(s.lora_targets or DEFAULT_TARGETS), float(s.lora_dropout or 0.0), s.seed)


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


def fans(cfg, target):
    """(in, out) of a target's Conv1D weight (stored (in, out))."""
    C = cfg.n_embd
    return {"attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C), "mlp.c_fc": (C, 4 * C),
            "mlp.c_proj": (4 * C, C)}[target]


def adapter_shapes(cfg, lora):
    """[(name, shape)] of the trainable tensors, in layer order: h.{l}.{target}.lora_A (r, in)
    and .lora_B (out, r), peft's shapes."""
    shapes = []
    for l in range(cfg.n_layer):
        for target in lora.targets:
            fan_in, fan_out = fans(cfg, target)
            shapes += [(f"h.{l}.{target}.lora_A", (lora.rank, fan_in)),
                       (f"h.{l}.{target}.lora_B", (fan_out, lora.rank))]
    return shapes


def adapter_layout(cfg, lora):
    return Layout(adapter_shapes(cfg, lora))


def block_matrix(name):
    """A block's Conv1D weight: only matmuls read it."""
    return name.startswith("h.") and name.endswith(tuple(f"{t}.weight" for t in TARGETS))


def base_layout(cfg, lora, low):
    """The layout of the fp32 parameter arena: every parameter; but with LoRA in bf16
    the frozen block matrices are held only as their bf16 copy (they never change and
    matmuls read only the copy), so the arena keeps the rest (embeddings, biases,
    layernorms)."""
    shapes = param_shapes(cfg)
    if lora is not None and low:
        shapes = [(name, shape) for name, shape in shapes if not block_matrix(name)]
    return Layout(shapes)


def trainable_layout(cfg, lora):
    """What gradients, Adam state and the optimizer's shards cover: every parameter,
    or with LoRA the adapters."""
    return param_layout(cfg) if lora is None else adapter_layout(cfg, lora)


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
    W + (alpha/r) A^T B^T, computed in float64 and rounded once."""
    out = dict(base)
    for l in range(cfg.n_layer):
        for target in lora.targets:
            h = f"h.{l}.{target}"
            a, b = (adapters[f"{h}.lora_{k}"].astype(np.float64) for k in "AB")
            out[h + ".weight"] = (base[h + ".weight"] + lora.scale * (a.T @ b.T)).astype(np.float32)
    return out


# peft's files
def peft_name(name):
    """h.0.attn.c_attn.lora_A -> base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"""
    return PEFT_PREFIX + name + ".weight"


def peft_config(lora, base):
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout, "target_modules": list(lora.targets), "fan_in_fan_out": True,
            "bias": "none", "base_model_name_or_path": base, "inference_mode": True,
            "init_lora_weights": True, "modules_to_save": None}


def save_peft(directory, lora, adapters, base):
    """adapter_model.safetensors + adapter_config.json into an existing directory."""
    from safetensors.numpy import save_file
    save_file({peft_name(k): np.ascontiguousarray(v, dtype=np.float32) for k, v in adapters.items()},
              os.path.join(directory, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(peft_config(lora, base), f, indent=2)


def is_peft_dir(path):
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "adapter_config.json"))


def read_peft(directory):
    """A peft LoRA adapter directory -> (Lora, base path or name, {name: array})."""
    from trainer.weights import read_safetensors
    where = os.path.join(directory, "adapter_config.json")
    try:
        with open(where) as f:
            config = json.load(f)
        if config.get("peft_type") != "LORA":
            raise WeightsError(f"{where}: peft_type {config.get('peft_type')!r}, coregpt reads LORA adapters")
        targets = config["target_modules"]
        targets = parse_targets(",".join(targets if isinstance(targets, list) else [targets]))
        lora = Lora(int(config["r"]), float(config["lora_alpha"]), targets, float(config.get("lora_dropout", 0.0)))
        base = config["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"{where}: not a peft LoRA config ({e})") from None
    if config.get("bias", "none") != "none" or config.get("use_dora") or config.get("modules_to_save"):
        raise WeightsError(f"{where}: coregpt reads plain LoRA adapters (bias none, no DoRA, no modules_to_save)")
    path = os.path.join(directory, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise WeightsError(f"{directory} holds no adapter_model.safetensors")
    tensors = {}
    for name, value in read_safetensors(path).items():
        if not (name.startswith(PEFT_PREFIX) and name.endswith(".weight")):
            raise WeightsError(f"{path}: unexpected tensor {name}")
        tensors[name[len(PEFT_PREFIX):-len(".weight")]] = value
    return lora, base, tensors


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
