"""How llama.cpp's GGUF files hold this family (architectures `llama` and `qwen2`):
the metadata keys that stand for config.json's fields, each parameter's GGUF name,
and the row permutation llama.cpp's converter gives a Llama's q and k projections
(its rotary kernel pairs neighbouring rows, transformers' rotate_half pairs the two
halves of each head), undone here.  Qwen2 files keep transformers' order."""
import numpy as np

ARCHITECTURES = ("llama", "qwen2")
LAYER = {  # transformers' name in model.layers.{i} -> llama.cpp's in blk.{i}
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
          "lm_head.weight": "output.weight"}


def hf_config(arch, meta, tensors):
    """GGUF metadata {key: value} and tensor names -> the config.json fields they
    stand for (what is not built is named there, and refused by from_hf)."""
    def key(name, default=None):
        return meta.get(f"{arch}.{name}", default)
    hf = {"model_type": arch, "num_hidden_layers": key("block_count"), "hidden_size": key("embedding_length"),
          "intermediate_size": key("feed_forward_length"), "num_attention_heads": key("attention.head_count"),
          "num_key_value_heads": key("attention.head_count_kv"), "max_position_embeddings": key("context_length"),
          "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-6), "rope_theta": key("rope.freq_base", 1e4),
          "vocab_size": key("vocab_size") or len(meta.get("tokenizer.ggml.tokens") or ()) or None,
          "tie_word_embeddings": "output.weight" not in tensors,
          "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"), "eos_token_id": meta.get("tokenizer.ggml.eos_token_id")}
    if key("rope.scaling.type") not in (None, "none"):
        hf["rope_scaling"] = {"rope_type": key("rope.scaling.type")}
    if "rope_freqs.weight" in tensors:  # llama.cpp's form of Llama 3.1+'s llama3 scaling
        hf["rope_scaling"] = {"rope_type": "per-dimension factors (rope_freqs.weight)"}
    if key("attention.key_length") is not None:
        hf["head_dim"] = key("attention.key_length")
    if key("attention.sliding_window"):
        hf["use_sliding_window"] = True
    if key("expert_count"):
        hf["num_experts"] = key("expert_count")
    if arch == "llama" and "blk.0.attn_q.bias" in tensors:
        hf["attention_bias"] = True
    return hf


def tensor_names(cfg):
    """{coregpt's (transformers') name: GGUF name} of every parameter of cfg."""
    names = {name: GLOBAL[name] for name in GLOBAL if name != "lm_head.weight" or not cfg.tied}
    for i in range(cfg.n_layer):
        names.update({f"model.layers.{i}.{name}": f"blk.{i}.{gguf}" for name, gguf in LAYER.items()
                      if cfg.qkv_bias or not name.endswith(".bias")})
    return names


def rotary_heads(cfg, name):
    """The heads whose rows llama.cpp interleaves in tensor `name` (a Llama's q or k
    projection), or None where it keeps transformers' order."""
    if cfg.model_type == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
        return cfg.n_head if "q_proj" in name else cfg.n_kv_head
    return None


def as_transformers(cfg, name, array):
    """A dequantized tensor (rows as GGUF's shape says) -> as transformers holds it."""
    heads = rotary_heads(cfg, name)
    return array if heads is None else interleaved(array, heads, undo=True)


def interleaved(weight, heads, undo=False):
    """Each head's rows from two halves to llama.cpp's interleaved pairs (undo: back)."""
    half = weight.shape[0] // heads // 2
    split = (heads, half, 2) if undo else (heads, 2, half)
    return np.ascontiguousarray(weight.reshape(*split, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape))


def write_config(writer, cfg):
    """cfg's fields as llama.cpp's metadata keys (a gguf.GGUFWriter of cfg's architecture)."""
    writer.add_block_count(cfg.n_layer)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(cfg.n_ffn)
    writer.add_head_count(cfg.n_head)
    writer.add_head_count_kv(cfg.n_kv_head)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.n_embd // cfg.n_head)


def as_gguf(cfg, name, array):
    """A tensor as transformers holds it -> as llama.cpp stores it (as_transformers undone)."""
    heads = rotary_heads(cfg, name)
    return array if heads is None else interleaved(array, heads)
