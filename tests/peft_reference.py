"""Hugging Face transformers' GPT2LMHeadModel with peft's LoRA: the independent
reference coregpt's LoRA is tested against (test-only dependencies)."""
import torch
import torch.nn.functional as F


def hf_model(state, n_layer, n_head, n_embd, n_ctx, vocab):
    """GPT2LMHeadModel (eager attention, no dropout) holding the weights `state` (HF names)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_ctx, vocab_size=vocab,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new",
                        layer_norm_epsilon=1e-5)
    model = GPT2LMHeadModel(config, attn_implementation="eager") if _takes_attn() else GPT2LMHeadModel(config)
    missing, unexpected = model.transformer.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(".attn.bias") or k.endswith("masked_bias") for k in missing), missing
    model.config._attn_implementation = "eager"
    return model.float()


def _takes_attn():
    import inspect
    from transformers import GPT2LMHeadModel
    return "attn_implementation" in inspect.signature(GPT2LMHeadModel.__init__).parameters


def peft_model(model, r, alpha, targets, adapters=None):
    """peft's LoRA on `model`'s Conv1D `targets`; adapters {h.{l}.{target}.lora_A/B:
    array} replaces peft's own initialisation when given."""
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                        fan_in_fan_out=True, bias="none", task_type="CAUSAL_LM")
    peft = get_peft_model(model, config)
    if adapters is not None:
        params = dict(peft.named_parameters())
        with torch.no_grad():
            for name, value in adapters.items():
                params[f"base_model.model.transformer.{name}.default.weight"].copy_(torch.as_tensor(value))
    return peft


def adapter_state(peft):
    """{h.{l}.{target}.lora_A/B: tensor} of a peft model's default adapter."""
    prefix = "base_model.model.transformer."
    return {name[len(prefix):-len(".default.weight")]: p.detach().clone()
            for name, p in peft.named_parameters() if "lora_" in name}


def loss_of(model, idx, targets):
    logits = model(input_ids=idx).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
