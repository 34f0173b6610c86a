"""GPT-2's configuration and names: presets, parameter shapes as Hugging Face names
them (Conv1D weights stored (in, out)), initialisation, the names in HF and peft
files, the LoRA target table, and the activation spec the activation arena is
built from (trainer/activations.py)."""
import sys
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np

from trainer.errors import WeightsError

MODEL_TYPE = "gpt2"
VOCAB = 50257
EOT = 50256  # <|endoftext|>


def tokenizer():
    """GPT-2's BPE (tiktoken's, offline): encode(text) -> ids, decode(ids) -> text."""
    from trainer.corpus import gpt2_encoding
    return gpt2_encoding()


def tokenizer_files():
    """{file name in a Hugging Face directory: path}: GPT-2's BPE as transformers reads it."""
    from trainer.corpus import gpt2_bpe_files
    encoder, vocab = gpt2_bpe_files()
    return {"vocab.json": encoder, "merges.txt": vocab}


EMBEDDING = "wte.weight"  # the tensor that says a file holds this family's weights
EXPORTS = ("hf", "llmc", "gguf")  # export --format: llm.c's .bin is GPT-2's by definition
BUILTIN_TOKENIZER = True  # tiktoken's GPT-2 BPE (trainer/tokenizer.py), not a directory's tokenizer.json
HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # what --init-from may download

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
    vocab_size: int = VOCAB
    model_type: ClassVar[str] = MODEL_TYPE

    def check(self):
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        return self

    @property
    def family(self):
        """This module: the tables of the family (names, activation spec, LoRA targets)
        for trainer/ modules that the family's model itself imports."""
        return sys.modules[__name__]

    @property
    def n_kv_head(self):
        return self.n_head  # each head its own keys and values

    def describe(self):
        """The header's words for it."""
        return f"GPT-2: {self.n_layer} layers, {self.n_embd} channels, {self.n_head} heads"

    def fields(self):
        """What rebuilds it: GPTConfig(**fields)."""
        return asdict(self)

    def to_hf(self):
        """config.json as transformers' GPT2Config writes it."""
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": MODEL_TYPE,
            "vocab_size": self.vocab_size, "n_positions": self.block_size,
            "n_ctx": self.block_size, "n_embd": self.n_embd, "n_layer": self.n_layer,
            "n_head": self.n_head, "n_inner": None, "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
            "attn_pdrop": 0.0, "initializer_range": 0.02, "tie_word_embeddings": True,
            "bos_token_id": EOT, "eos_token_id": EOT,
        }

    @staticmethod
    def from_hf(hf):
        n_embd = int(hf["n_embd"])
        return GPTConfig(n_layer=int(hf["n_layer"]), n_head=int(hf.get("n_head") or n_embd // 64),
                         n_embd=n_embd, block_size=int(hf.get("n_positions") or hf.get("n_ctx")),
                         vocab_size=int(hf.get("vocab_size", VOCAB))).check()


def preset(name, overrides, vocab_size=VOCAB):
    """The config of preset `name` with `overrides` (None: keep the preset's)."""
    values = dict(PRESETS[name], vocab_size=vocab_size)
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return GPTConfig(**values).check()
    except ValueError as e:
        raise WeightsError(str(e)) from None


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


def block_tensor(name):
    """A tensor of one block -> (layer, its name within the block); None for the others."""
    if not name.startswith("h."):
        return None
    _, layer, rest = name.split(".", 2)
    return int(layer), rest


def init_params(cfg, params, seed):
    """GPT-2 initialisation: N(0, 0.02) weights, residual projections scaled by
    1/sqrt(2·n_layer), zero biases, unit LayerNorm gains."""
    rng = np.random.default_rng(seed)
    for name, view in params.items():
        init_tensor(cfg, name, view, rng)


def init_tensors(cfg, seed):
    """init_params's tensors one at a time, (name, array) in layout order, each made as
    it is asked for (the same values init_params writes in place)."""
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


# Hugging Face files
def tensor_name(hf_name):
    """A tensor's name in an HF GPT-2 file -> coregpt's, or None for what is not a
    parameter here (the causal-mask buffers, and lm_head: it is tied to wte)."""
    name = hf_name.removeprefix("transformer.")
    if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
        return None
    return name


def infer_config(shapes, path):
    """A bare .safetensors: the config from its tensors' {name: shape}; n_head = n_embd / 64."""
    if "wte.weight" not in shapes or "wpe.weight" not in shapes:
        raise WeightsError(f"{path} has no tensor wte.weight / wpe.weight: not GPT-2 weights")
    V, C = shapes["wte.weight"]
    layers = {int(k.split(".")[1]) for k in shapes if k.startswith("h.")}
    return GPTConfig(n_layer=len(layers), n_head=max(1, C // 64), n_embd=C,
                     block_size=shapes["wpe.weight"][0], vocab_size=V).check()


BLOCK_MATRICES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # a block's Conv1D layers

# LoRA as peft applies it to GPT-2's Conv1D layers
LORA_TARGETS = BLOCK_MATRICES
LORA_DEFAULT = "c_attn"  # peft's default for GPT-2
# what --lora-targets accepts for each target: peft's module-name suffixes
LORA_ALIASES = {"c_attn": "attn.c_attn", "attn.c_attn": "attn.c_attn", "attn.c_proj": "attn.c_proj",
                "c_fc": "mlp.c_fc", "mlp.c_fc": "mlp.c_fc", "mlp.c_proj": "mlp.c_proj"}
LORA_CHOICES = "c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj"  # as --help and errors list them
PEFT_PREFIX = "base_model.model.transformer."
FAN_IN_FAN_OUT = True  # Conv1D weights are (in, out)


def lora_fans(cfg, target):
    """(in, out) of a target's Conv1D weight (stored (in, out))."""
    C = cfg.n_embd
    return {"attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C), "mlp.c_fc": (C, 4 * C),
            "mlp.c_proj": (4 * C, C)}[target]


def target_weight(layer, target):
    """The name of layer `layer`'s weight that `target` adapts (its adapters are
    named after it: h.0.attn.c_attn.lora_A)."""
    return f"h.{layer}.{target}.weight"


def block_matrix(name):
    """A block's Conv1D weight: only matmuls read it."""
    return name.startswith("h.") and name.endswith(tuple(f"{t}.weight" for t in BLOCK_MATRICES))


def lora_delta(a, b):
    """A (r, in), B (out, r) -> ΔW = AᵀBᵀ, (in, out) as the Conv1D weight is stored."""
    return a.T @ b.T


# The activation spec (trainer/activations.py builds the arena from it)
def activation_shapes(cfg, B, T, training, head_rows):
    """[(name, shape, row axis)] of every activation of B batch rows: the row axis is
    the one split between workers (the N = B·T token rows; for lse the B·NH (row,
    head) pairs of attention), after the layer axis if any (a row axis of 1 means a
    layer axis first).  head_rows: rows of the lm head's logits chunk."""
    L, C, NH, V, N = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size, B * T
    shapes = [
        ("residual", (L + 1, N, C), 1),
        ("ln1", (L, N, C), 1), ("ln1_mean", (L, N, 1), 1), ("ln1_rstd", (L, N, 1), 1),
        ("qkv", (L, N, 3 * C), 1), ("lse", (L, B * NH, T), 1), ("atty", (L, N, C), 1),
        ("resid2", (L, N, C), 1),
        ("ln2", (L, N, C), 1), ("ln2_mean", (L, N, 1), 1), ("ln2_rstd", (L, N, 1), 1),
        ("fch", (L, N, 4 * C), 1), ("fch_gelu", (L, N, 4 * C), 1),
        ("lnf", (N, C), 0), ("lnf_mean", (N, 1), 0), ("lnf_rstd", (N, 1), 0),
        ("logits", (head_rows, V), 0), ("rowtmp", (N, 1), 0),
    ]
    if training:  # gradients of every matmul output and layernorm input, for the weights' (one layer's)
        shapes += [
            ("dresidual", (L + 1, N, C), 1), ("dresid2", (L, N, C), 1),
            ("dln1", (L, N, C), 1), ("dln2", (L, N, C), 1), ("dlnf", (N, C), 0),
            ("dqkv", (L, N, 3 * C), 1), ("dfch", (L, N, 4 * C), 1),
            ("norm", (N, C), 0), ("dnorm", (N, C), 0), ("datty", (N, C), 0),
            ("gelu_th", (N, 4 * C), 0), ("gelu_slope", (N, 4 * C), 0),
        ]
    return shapes


# activations that matmuls read: in bf16 each gets a bf16 copy (the logits' is of dlogits)
LOW_COPIES = ("ln1", "atty", "ln2", "fch_gelu", "lnf", "dqkv", "dresid2", "dfch", "dresidual", "logits")
# ... of which only matmuls read these: in bf16 their fp32 rows live in a one-layer scratch
# (attention's backward reads its output atty, so that one keeps every layer's fp32 rows)
LOW_ONLY = ("ln1", "ln2", "fch_gelu", "lnf")
GRADIENTS = ("dresid2", "dln1", "dln2", "dqkv", "dfch")  # one layer's room each
RESIDUAL, RESIDUAL_GRADIENT = "residual", "dresidual"  # the blocks' inputs; their gradient (two layers' room)
CACHED = "qkv"  # what sampling keeps of earlier positions: their keys and values (trainer.activations.KVCache)
