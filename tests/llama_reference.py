"""Hugging Face transformers' LlamaForCausalLM and Qwen2ForCausalLM with random
weights: the independent reference the Llama family is tested against (test-only
dependencies), and the same training steps in PyTorch (AdamW + clip_grad_norm_)."""
import json
import os

import numpy as np
import torch

VOCAB = 300
# the tiny cases: grouped-query attention (4 query heads, 2 K/V heads), tied and
# untied heads, Llama 3's rope scaling, Qwen2's q/k/v biases
SHAPE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
             intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=64, rms_norm_eps=1e-6)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
CASES = {
    "llama-gqa-tied-llama3": dict(kind="llama", tie_word_embeddings=True, rope_scaling=LLAMA3, rope_theta=500000.0),
    "qwen2-untied-biases": dict(kind="qwen2", tie_word_embeddings=False, rope_theta=1000000.0),
}


def hf_config(kind, rope_scaling=None, rope_theta=10000.0, **fields):
    from transformers import LlamaConfig, Qwen2Config
    if rope_scaling is not None:  # transformers 5 reads rope_theta from inside the rope dict
        fields["rope_scaling"] = dict(rope_scaling, rope_theta=rope_theta)
    else:
        fields["rope_theta"] = rope_theta
    return (Qwen2Config if kind == "qwen2" else LlamaConfig)(**{**SHAPE, **fields})


def hf_model(name, seed=0):
    """A case's model in float32 with eager attention, its weights random from seed
    (Qwen2's biases too, which transformers initialises to zero)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    config = hf_config(**CASES[name])
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if param_name.endswith("bias"):
                p.normal_(0, 0.1)
            elif param_name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def write_model_dir(directory, model):
    """save_pretrained's own files (config.json, model.safetensors)."""
    model.save_pretrained(directory, safe_serialization=True)
    with open(os.path.join(directory, "config.json")) as f:
        assert json.load(f)["model_type"] in ("llama", "qwen2")


def train_reference(model, tokens, B, T, steps, lr, wd, clip, bf16=False):
    """steps of AdamW (decay on 2-D parameters, betas 0.9/0.95, eps 1e-8) with
    clip_grad_norm_, the windows in file order wrapping to the start (DESIGN.md's
    batch order) -> (losses, {name: final weight}, exact gradient norm of every step)."""
    params = dict(model.named_parameters())
    decay = [p for p in params.values() if p.dim() == 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8)
    losses, norms, pos = [], [], 0
    for _ in range(steps):
        window = torch.from_numpy(tokens[pos:pos + B * T + 1].astype(np.int64))
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=window[:-1].view(B, T)).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), window[1:])
        loss.backward()
        norms.append(sum(float((p.grad.double() ** 2).sum()) for p in params.values()) ** 0.5)
        torch.nn.utils.clip_grad_norm_(params.values(), clip)
        opt.step()
        losses.append(loss.item())
        pos += B * T
        if pos + B * T + 1 > len(tokens):
            pos = 0
    return losses, {name: p.detach().numpy().copy() for name, p in model.state_dict().items()}, norms
