"""The Llama family's configuration and names (Hugging Face model_type llama and
qwen2): presets, parameter shapes as transformers names them (nn.Linear weights
stored (out, in)), initialisation, the names in HF and peft files, the LoRA target
table, and the activation spec the activation arena is built from
(trainer/activations.py).  What a config asks for that is not built here is refused
by name (from_hf), never trained wrong."""
import sys
from dataclasses import asdict, dataclass

import numpy as np

from trainer.errors import WeightsError

MODEL_TYPE = "llama"
MODEL_TYPES = ("llama", "qwen2")  # Qwen2 is Llama with q/k/v biases
HUB_NAMES = ()
EMBEDDING = "model.embed_tokens.weight"  # the tensor that says a file holds this family's weights
EXPORTS = ("hf", "gguf")  # export --format (and peft for a LoRA run's adapter)
BUILTIN_TOKENIZER = False  # each model brings its tokenizer.json (trainer/tokenizer.py)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

PRESETS = {  # the published shapes (DESIGN.md)
    "smollm2-135m": dict(model_type="llama", n_layer=30, n_head=9, n_kv_head=3, n_embd=576, n_ffn=1536,
                         vocab_size=49152, block_size=8192, rope_theta=100000.0, tied=True, bos=0, eos=0),
    "smollm2-360m": dict(model_type="llama", n_layer=32, n_head=15, n_kv_head=5, n_embd=960, n_ffn=2560,
                         vocab_size=49152, block_size=8192, rope_theta=100000.0, tied=True, bos=0, eos=0),
    "qwen2.5-0.5b": dict(model_type="qwen2", n_layer=24, n_head=14, n_kv_head=2, n_embd=896, n_ffn=4864,
                         vocab_size=151936, block_size=32768, rope_theta=1000000.0, tied=True, qkv_bias=True,
                         rms_eps=1e-6, bos=151643, eos=151643),
    "llama-3.2-1b": dict(model_type="llama", n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, n_ffn=8192,
                         vocab_size=128256, block_size=131072, rope_theta=500000.0, tied=True,
                         rope_scaling=(32.0, 1.0, 4.0, 8192), bos=128000, eos=128001),
}


@dataclass(frozen=True)
class LlamaConfig:
    model_type: str
    n_layer: int
    n_head: int
    n_kv_head: int
    n_embd: int
    n_ffn: int  # the MLP's width (intermediate_size)
    vocab_size: int
    block_size: int  # max_position_embeddings
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None  # llama3's (factor, low_freq_factor, high_freq_factor, original context)
    rms_eps: float = 1e-5
    tied: bool = True  # tie_word_embeddings
    qkv_bias: bool = False  # Qwen2's
    bos: int | None = None
    eos: int | None = None

    def check(self):
        for name in ("n_layer", "n_head", "n_kv_head", "n_embd", "n_ffn", "vocab_size", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd {self.n_embd} is not an even head size times n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")
        if self.n_embd % 16 or self.kv_width % 16:
            # q, k, v (and gate, up) sit back to back in the arena, read as one matrix
            raise ValueError(f"n_embd {self.n_embd} and n_kv_head x head size {self.kv_width} must be multiples "
                             f"of 16")
        return self

    @property
    def head_size(self):
        return self.n_embd // self.n_head

    @property
    def kv_width(self):
        return self.n_kv_head * self.head_size

    @property
    def family(self):
        """This module: the family's tables (names, activation spec, LoRA targets)."""
        return sys.modules[__name__]

    def describe(self):
        """The header's words for it."""
        return (f"{self.model_type}: {self.n_layer} layers, {self.n_embd} channels, {self.n_head} heads "
                f"({self.n_kv_head} K/V), MLP {self.n_ffn}, vocabulary {self.vocab_size:,}, "
                f"{'tied' if self.tied else 'untied'} head")

    def fields(self):
        """What rebuilds it: LlamaConfig(**fields)."""
        return asdict(self)

    def to_hf(self):
        """config.json as transformers writes it for LlamaForCausalLM / Qwen2ForCausalLM."""
        hf = {"architectures": [ARCHITECTURES[self.model_type]], "model_type": self.model_type,
              "vocab_size": self.vocab_size, "hidden_size": self.n_embd, "intermediate_size": self.n_ffn,
              "num_hidden_layers": self.n_layer, "num_attention_heads": self.n_head,
              "num_key_value_heads": self.n_kv_head, "head_dim": self.head_size, "hidden_act": "silu",
              "max_position_embeddings": self.block_size, "initializer_range": 0.02, "rms_norm_eps": self.rms_eps,
              "rope_theta": self.rope_theta, "rope_scaling": None, "tie_word_embeddings": self.tied,
              "attention_dropout": 0.0, "bos_token_id": self.bos, "eos_token_id": self.eos, "use_cache": True,
              "torch_dtype": "float32"}
        if self.rope_scaling is not None:
            hf["rope_scaling"] = dict(zip(LLAMA3_KEYS, self.rope_scaling), rope_type="llama3")
        if self.model_type == "llama":
            hf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
        else:
            hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.n_layer)
        return hf

    @staticmethod
    def from_hf(hf):
        refuse_unbuilt(hf)
        n_embd, n_head = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        rope = rope_of(hf)
        eos = hf.get("eos_token_id")
        return LlamaConfig(
            model_type=hf["model_type"], n_layer=int(hf["num_hidden_layers"]), n_head=n_head,
            n_kv_head=int(hf.get("num_key_value_heads") or n_head), n_embd=n_embd,
            n_ffn=int(hf["intermediate_size"]), vocab_size=int(hf["vocab_size"]),
            block_size=int(hf.get("max_position_embeddings") or 2048), rope_theta=float(rope["rope_theta"]),
            rope_scaling=tuple(float(rope[k]) for k in LLAMA3_KEYS) if rope["rope_type"] == "llama3" else None,
            rms_eps=float(hf.get("rms_norm_eps", 1e-6)), tied=bool(hf.get("tie_word_embeddings", True)),
            qkv_bias=hf["model_type"] == "qwen2", bos=hf.get("bos_token_id"),
            eos=eos[0] if isinstance(eos, list) else eos).check()


def rope_of(hf):
    """{rope_type, rope_theta, llama3's keys} from rope_scaling (the hub's configs, with
    rope_theta beside it) or rope_parameters (transformers 5's)."""
    parameters = hf.get("rope_parameters") or {}
    rope = dict(hf.get("rope_scaling") or parameters)
    rope.setdefault("rope_theta", hf.get("rope_theta") or parameters.get("rope_theta") or 10000.0)
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    return rope


def refuse_unbuilt(hf):
    """A config asking for what coregpt does not build: WeightsError naming it."""
    rope = rope_of(hf)
    head_dim = hf.get("head_dim")
    unbuilt = [
        (rope["rope_type"] not in ("default", "llama3"), f"rope type {rope['rope_type']!r}"),
        (hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or ()),
         "sliding-window attention"),
        (any(hf.get(k) for k in ("num_experts", "num_local_experts", "n_routed_experts")), "mixture of experts"),
        (hf.get("hidden_act", "silu") != "silu", f"hidden_act {hf.get('hidden_act')!r}"),
        (hf["model_type"] == "llama" and hf.get("attention_bias"), "attention_bias (biases beyond Qwen2's q/k/v)"),
        (hf.get("mlp_bias"), "mlp_bias"),
        (head_dim is not None and int(head_dim) * int(hf["num_attention_heads"]) != int(hf["hidden_size"]),
         f"head_dim {head_dim} other than hidden_size / num_attention_heads"),
    ]
    for asked, what in unbuilt:
        if asked:
            raise WeightsError(f"{hf['model_type']} config asks for {what}, which coregpt does not train")


def preset(name, overrides, vocab_size=None):
    """The config of preset `name` with --n-layer … `overrides` (None: the preset's)."""
    values = dict(PRESETS[name])
    if overrides.get("n_embd") or overrides.get("n_head"):
        raise WeightsError(f"--model {name}: --n-embd and --n-head are the preset's; --n-layer and --block-size "
                           f"may change")
    values.update({k: v for k, v in overrides.items() if v is not None and k in ("n_layer", "block_size")})
    try:
        return LlamaConfig(**values).check()
    except ValueError as e:
        raise WeightsError(str(e)) from None


LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def linear_shapes(cfg):
    """{linear layer: (out, in)} of a block."""
    C, KV, F = cfg.n_embd, cfg.kv_width, cfg.n_ffn
    return {"self_attn.q_proj": (C, C), "self_attn.k_proj": (KV, C), "self_attn.v_proj": (KV, C),
            "self_attn.o_proj": (C, C), "mlp.gate_proj": (F, C), "mlp.up_proj": (F, C), "mlp.down_proj": (C, F)}


def param_shapes(cfg):
    """[(hf_name, shape)] in arena order: q, k, v back to back (weights, then biases),
    and gate, up: each group is read as one matrix."""
    C, V, linears = cfg.n_embd, cfg.vocab_size, linear_shapes(cfg)
    shapes = [("model.embed_tokens.weight", (V, C))]
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        shapes.append((p + "input_layernorm.weight", (C,)))
        shapes += [(p + name + ".weight", linears[name]) for name in LINEARS[:3]]
        if cfg.qkv_bias:
            shapes += [(p + name + ".bias", (linears[name][0],)) for name in LINEARS[:3]]
        shapes += [(p + "self_attn.o_proj.weight", linears["self_attn.o_proj"]),
                   (p + "post_attention_layernorm.weight", (C,))]
        shapes += [(p + name + ".weight", linears[name]) for name in LINEARS[4:]]
    shapes.append(("model.norm.weight", (C,)))
    if not cfg.tied:
        shapes.append(("lm_head.weight", (V, C)))
    return shapes


def head_name(cfg):
    """The weight the lm head multiplies by."""
    return "model.embed_tokens.weight" if cfg.tied else "lm_head.weight"


def block_tensor(name):
    """A tensor of one block -> (layer, its name within the block); None for the others."""
    if not name.startswith("model.layers."):
        return None
    layer, rest = name[len("model.layers."):].split(".", 1)
    return int(layer), rest


def init_params(cfg, params, seed):
    """transformers' initialisation: N(0, 0.02) weights and embeddings, zero biases,
    unit RMSNorm gains."""
    rng = np.random.default_rng(seed)
    for name, view in params.items():
        init_tensor(name, view, rng)


def init_tensors(cfg, seed):
    """init_params's tensors one at a time, (name, array) in layout order."""
    rng = np.random.default_rng(seed)
    for name, shape in param_shapes(cfg):
        tensor = np.empty(shape, dtype=np.float32)
        init_tensor(name, tensor, rng)
        yield name, tensor


def init_tensor(name, view, rng):
    if name.endswith("norm.weight"):
        view[...] = 1.0
    elif view.ndim == 1:
        view[...] = 0.0
    else:
        rng.standard_normal(out=view, dtype=np.float32)
        view *= np.float32(0.02)


def tensor_name(hf_name):
    """A tensor's name in an HF file -> coregpt's (the same), or None for buffers."""
    return None if hf_name.endswith("rotary_emb.inv_freq") else hf_name


def infer_config(shapes, path):
    """A bare .safetensors cannot say its heads: the family needs config.json."""
    raise WeightsError(f"{path}: Llama-family weights need their config.json beside them (their heads and "
                       f"rope are not in the tensors)")


# LoRA as peft applies it to the blocks' nn.Linear layers
LORA_TARGETS = LINEARS
LORA_DEFAULT = "q_proj,v_proj"  # peft's for llama and qwen2
LORA_ALIASES = {alias: name for name in LINEARS for alias in (name, name.split(".")[1])}
LORA_CHOICES = "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
PEFT_PREFIX = "base_model.model."
FAN_IN_FAN_OUT = False  # nn.Linear weights are (out, in)


def lora_fans(cfg, target):
    """(in, out) of a target's weight (stored (out, in))."""
    out, fan_in = linear_shapes(cfg)[target]
    return fan_in, out


def target_weight(layer, target):
    return f"model.layers.{layer}.{target}.weight"


def block_matrix(name):
    """A block's linear weight: only matmuls read it."""
    return name.startswith("model.layers.") and name.endswith(tuple(f"{t}.weight" for t in LINEARS))


def lora_delta(a, b):
    """A (r, in), B (out, r) -> ΔW = B A, (out, in) as the weight is stored."""
    return b @ a


# The activation spec (trainer/activations.py builds the arena from it)
def activation_shapes(cfg, B, T, training, head_rows):
    """[(name, shape, row axis)] of every activation of B batch rows (see GPT-2's):
    qkv holds q, k, v side by side (rotated q and k), gateup the gate and up projections."""
    L, C, NH, V, N = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size, B * T
    QKV, F = C + 2 * cfg.kv_width, cfg.n_ffn
    shapes = [
        ("residual", (L + 1, N, C), 1), ("ln1", (L, N, C), 1), ("ln1_rstd", (L, N, 1), 1),
        ("qkv", (L, N, QKV), 1), ("lse", (L, B * NH, T), 1), ("atty", (L, N, C), 1), ("resid2", (L, N, C), 1),
        ("ln2", (L, N, C), 1), ("ln2_rstd", (L, N, 1), 1), ("gateup", (L, N, 2 * F), 1), ("swiglu", (L, N, F), 1),
        ("lnf", (N, C), 0), ("lnf_rstd", (N, 1), 0), ("logits", (head_rows, V), 0), ("rowtmp", (N, 1), 0),
        ("rope_tmp", (N, C), 0),
    ]
    if training:
        shapes += [
            ("dresidual", (L + 1, N, C), 1), ("dresid2", (L, N, C), 1), ("dln1", (L, N, C), 1),
            ("dln2", (L, N, C), 1), ("dlnf", (N, C), 0), ("dqkv", (L, N, QKV), 1), ("dgateup", (L, N, 2 * F), 1),
            ("norm", (N, C), 0), ("dnorm", (N, C), 0), ("datty", (N, C), 0), ("dswiglu", (N, F), 0),
            ("swiglu_tmp", (N, F), 0),
        ]
    return shapes


LOW_COPIES = ("ln1", "atty", "ln2", "swiglu", "lnf", "dqkv", "dresid2", "dgateup", "dresidual", "logits")
LOW_ONLY = ("ln1", "ln2", "swiglu", "lnf")
GRADIENTS = ("dresid2", "dln1", "dln2", "dqkv", "dgateup")
RESIDUAL, RESIDUAL_GRADIENT = "residual", "dresidual"
CACHED = "qkv"
