"""GPT-2 configuration and the one place that knows the parameter layout.

Parameters live in a single flat float32 arena; every tensor is a named view
into it.  Names and shapes are Hugging Face GPT-2's (Conv1D weights stored
(in, out)), so a checkpoint is just the arena's views written out by name.
"""
from dataclasses import dataclass, asdict

import numpy as np

GPT2_VOCAB = 50257
ALIGN = 16  # floats: tensors start on 64-byte boundaries

PRESETS = {
    # small from-scratch default: learns visibly in minutes on two cores
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=256),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),
}


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    vocab_size: int = GPT2_VOCAB

    def check(self):
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        return self

    def to_hf(self):
        """config.json as transformers' GPT2Config writes it."""
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": self.vocab_size, "n_positions": self.block_size,
            "n_ctx": self.block_size, "n_embd": self.n_embd, "n_layer": self.n_layer,
            "n_head": self.n_head, "n_inner": None, "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "attn_pdrop": 0.0, "initializer_range": 0.02, "tie_word_embeddings": True,
            "bos_token_id": 50256, "eos_token_id": 50256,
        }

    @staticmethod
    def from_hf(hf):
        n_embd = int(hf["n_embd"])
        return GPTConfig(n_layer=int(hf["n_layer"]), n_head=int(hf.get("n_head") or n_embd // 64),
                         n_embd=n_embd, block_size=int(hf.get("n_positions") or hf.get("n_ctx")),
                         vocab_size=int(hf.get("vocab_size", GPT2_VOCAB))).check()


def param_shapes(cfg):
    """[(hf_name, shape)] in arena order."""
    C, V = cfg.n_embd, cfg.vocab_size
    shapes = [("wte.weight", (V, C)), ("wpe.weight", (cfg.block_size, C))]
    for i in range(cfg.n_layer):
        h = f"h.{i}."
        shapes += [
            (h + "ln_1.weight", (C,)), (h + "ln_1.bias", (C,)),
            (h + "attn.c_attn.weight", (C, 3 * C)), (h + "attn.c_attn.bias", (3 * C,)),
            (h + "attn.c_proj.weight", (C, C)), (h + "attn.c_proj.bias", (C,)),
            (h + "ln_2.weight", (C,)), (h + "ln_2.bias", (C,)),
            (h + "mlp.c_fc.weight", (C, 4 * C)), (h + "mlp.c_fc.bias", (4 * C,)),
            (h + "mlp.c_proj.weight", (4 * C, C)), (h + "mlp.c_proj.bias", (C,)),
        ]
    shapes += [("ln_f.weight", (C,)), ("ln_f.bias", (C,))]
    return shapes


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


def param_layout(cfg):
    return Layout(param_shapes(cfg))


def shard_bounds(size, n_shards):
    """Contiguous, ALIGN-aligned [start, end) of each worker's optimizer shard."""
    step = -(-size // (n_shards * ALIGN)) * ALIGN
    return [(min(r * step, size), min((r + 1) * step, size)) for r in range(n_shards)]


def init_gpt2(cfg, params, seed):
    """GPT-2 initialisation: N(0, 0.02) weights, residual projections scaled by
    1/sqrt(2·n_layer), zero biases, unit LayerNorm gains."""
    rng = np.random.default_rng(seed)
    for name, view in params.items():
        init_tensor(cfg, name, view, rng)


def gpt2_init_tensors(cfg, seed):
    """init_gpt2's tensors one at a time, (name, array) in layout order, each made as
    it is asked for (the same values init_gpt2 writes in place)."""
    rng = np.random.default_rng(seed)
    for name, shape in param_shapes(cfg):
        tensor = np.empty(shape, dtype=np.float32)
        init_tensor(cfg, name, tensor, rng)
        yield name, tensor


def init_tensor(cfg, name, view, rng):
    if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
        view[...] = 1.0
    elif view.ndim == 1:
        view[...] = 0.0
    else:
        std = 0.02 / np.sqrt(2 * cfg.n_layer) if name.endswith("c_proj.weight") else 0.02
        rng.standard_normal(out=view, dtype=np.float32)
        view *= np.float32(std)
