"""How llama.cpp's GGUF files hold GPT-2 (architecture `gpt2`): the metadata keys of
its config, each parameter's GGUF name, and its matrices, which llama.cpp's
converter stores transposed ((out, in), as nn.Linear) from GPT-2's Conv1D (in, out)."""
import numpy as np

from trainer.errors import WeightsError

ARCHITECTURES = ("gpt2",)
LAYER = {  # GPT-2's name in h.{i} -> llama.cpp's in blk.{i}
    "ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
}
MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_config(arch, meta, tensors):
    """GGUF metadata -> config.json's fields; what GPT-2 here is not is refused."""
    def key(name, default=None):
        return meta.get(f"{arch}.{name}", default)
    n_embd = key("embedding_length")
    for what, value, built in (("feed_forward_length", key("feed_forward_length"), 4 * (n_embd or 0)),
                               ("attention.layer_norm_epsilon", key("attention.layer_norm_epsilon"), 1e-5)):
        if value is not None and abs(value - built) > 1e-9 * max(1, built):
            raise WeightsError(f"GGUF {arch}.{what} is {value}; GPT-2 here has {built}")
    vocab = len(meta.get("tokenizer.ggml.tokens") or ()) or (tensors.get("token_embd.weight") or (0, 0))[0]
    return {"model_type": "gpt2", "n_layer": key("block_count"), "n_embd": n_embd,
            "n_head": key("attention.head_count"), "n_positions": key("context_length"), "vocab_size": vocab}


def tensor_names(cfg):
    """{coregpt's name: GGUF name} of every parameter of cfg."""
    names = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
             "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias"}
    for i in range(cfg.n_layer):
        names.update({f"h.{i}.{name}.{kind}": f"blk.{i}.{gguf}.{kind}" for name, gguf in LAYER.items()
                      for kind in ("weight", "bias")})
    return names


def as_transformers(cfg, name, array):
    """A dequantized tensor -> as GPT-2 holds it (its matrices (in, out))."""
    return np.ascontiguousarray(array.T) if name.endswith(MATRICES) else array


def write_config(writer, cfg):
    """cfg's fields as llama.cpp's metadata keys (a gguf.GGUFWriter of architecture gpt2)."""
    writer.add_block_count(cfg.n_layer)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(4 * cfg.n_embd)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(1e-5)


as_gguf = as_transformers  # a transpose undoes itself
