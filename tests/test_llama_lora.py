"""LoRA on the Llama family as peft applies it: an adapter peft wrote on all seven
nn.Linear targets of a tiny GQA Llama, trained 8 steps by `python -m launch train`
and by peft (AdamW + clip_grad_norm_): losses and adapters within 1e-4; peft loads
coregpt's export with no missing or unexpected key and gives coregpt's logits; the
merged export equals merge_and_unload()."""
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import launch, read_metrics, write_token_file
from llama_reference import VOCAB, hf_model, write_model_dir

B, T, STEPS, LR, WD, CLIP = 4, 32, 8, 1e-3, 0.1, 1.0
RANK, ALPHA = 4, 8.0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_of(model, adapter=None):
    from peft import LoraConfig, PeftModel, get_peft_model
    if adapter is not None:
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def adapters_of(peft):
    """{name as peft's file names it: array} of the default adapter."""
    return {name.replace(".default", ""): p.detach().numpy().copy()
            for name, p in peft.named_parameters() if "lora_" in name}


def peft_reference(peft, tokens):
    trained = [p for p in peft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=WD)
    losses, pos = [], 0
    for _ in range(STEPS):
        window = torch.from_numpy(tokens[pos:pos + B * T + 1].astype(np.int64))
        opt.zero_grad()
        logits = peft(input_ids=window[:-1].view(B, T)).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), window[1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, CLIP)
        opt.step()
        losses.append(loss.item())
        pos = 0 if pos + 2 * B * T + 1 > len(tokens) else pos + B * T
    return losses, adapters_of(peft)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """root/init (the base), root/adapter (peft's own files, B random), tokens.bin ->
    (root, peft's losses, peft's final adapters)."""
    root = tmp_path_factory.mktemp("llama-lora")
    write_model_dir(root / "init", hf_model("llama-gqa-tied-llama3"))
    torch.manual_seed(1)
    peft = peft_of(hf_model("llama-gqa-tied-llama3"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    peft.peft_config["default"].base_model_name_or_path = str(root / "init")
    peft.save_pretrained(root / "adapter")
    tokens = np.random.default_rng(0).integers(0, VOCAB, 5 * B * T + 7).astype(np.uint16)
    write_token_file(root / "tokens.bin", tokens)
    return root, *peft_reference(peft, tokens)


def train(root, name, *extra):
    out = root / name
    done = launch("train", "--init-from", root / "adapter", "--data", root / "tokens.bin", "--data-order",
                  "sequential", "--batch-size", B, "--seq-len", T, "--steps", STEPS, "--lr", LR,
                  "--lr-schedule", "constant", "--warmup", 0, "--weight-decay", WD, "--grad-clip", CLIP,
                  "--threads-per-worker", 1, "--eval-every", 0, "--out-dir", out, *extra,
                  env={"COREGPT_ATTENTION_BLOCK": "8", "COREGPT_HEAD_ROWS": "40"})
    assert done.returncode == 0, done.stderr
    return out


@pytest.mark.e2e
@pytest.mark.parametrize("parallel, workers", [("hybrid", 1), ("hybrid", 3), ("data", 2)])
def test_training_matches_peft(case, parallel, workers):
    root, expected_losses, expected = case
    out = train(root, f"{parallel}{workers}", "--parallel", parallel, "--workers", workers)
    np.testing.assert_allclose([r["loss"] for r in read_metrics(out) if "loss" in r], expected_losses,
                               rtol=0, atol=1e-4)
    adapters = load_file(str(out / "checkpoints" / f"step_{STEPS:06d}" / "adapter_model.safetensors"))
    assert set(adapters) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(adapters[name], value, rtol=0, atol=1e-4, err_msg=name)


@pytest.mark.e2e
def test_peft_loads_the_export(case, tmp_path):
    from trainer.base import load_model
    from trainer.sample import Sampler
    root = case[0]
    out = train(root, "export-source", "--workers", 2)
    done = launch("export", "--checkpoint", out, "--format", "peft", "--out", tmp_path / "peft")
    assert done.returncode == 0, done.stderr
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(root / "init", dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, tmp_path / "peft")
    files = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    assert set(files) == {k for k in adapters_of(peft)}  # no missing or unexpected key
    tokens = list(range(100, 140))
    with torch.no_grad():
        expected = peft(input_ids=torch.tensor([tokens])).logits[0, -1].numpy()
    cfg, merged = load_model(str(out))
    np.testing.assert_allclose(Sampler(cfg, merged).forward(tokens, 0), expected, rtol=0, atol=1e-4)
    done = launch("export", "--checkpoint", out, "--format", "hf", "--out", tmp_path / "merged")
    assert done.returncode == 0, done.stderr
    exported = load_file(str(tmp_path / "merged" / "model.safetensors"))
    reference = peft.merge_and_unload().state_dict()
    assert set(exported) == set(reference) - {"lm_head.weight"}  # tied to the embedding
    for name, value in exported.items():
        np.testing.assert_allclose(value, reference[name].numpy(), rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.e2e
def test_targets_of_the_other_family_are_one_line(case, tmp_path):
    root = case[0]
    done = launch("train", "--init-from", root / "init", "--data", root / "tokens.bin", "--lora-rank", 4,
                  "--lora-targets", "c_attn", "--steps", 1, "--out-dir", tmp_path / "run")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "coregpt: error: --lora-targets: unknown target 'c_attn'; choose from q_proj, k_proj, v_proj, o_proj, "
        "gate_proj, up_proj, down_proj"]
