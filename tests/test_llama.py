"""The Llama family (Llama, Qwen2) against Hugging Face transformers: 8 training steps
of `python -m launch train` from a directory transformers wrote, every loss and
final weight within 1e-4 and the grad norm within 2e-5 (relative) of PyTorch's, for
1 to 4 workers, both strategies, with --recompute and under MPI; bf16 within 1.5x
the error of transformers' own bf16 autocast; resume bit for bit; grad-accum and 8-bit
Adam; the hf export loaded by AutoModelForCausalLM; greedy sampling equal to
model.generate's.  Also: sharded bf16 directories read exactly, the presets'
published shapes, and what is not built refused in one line."""
import os

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import launch, read_metrics, write_token_file
from llama_reference import CASES, VOCAB, hf_model, train_reference, write_model_dir

B, T, STEPS, LR, WD, CLIP = 4, 32, 8, 1e-3, 0.1, 1.0
N_TOKENS = 5 * B * T + 7  # steps 6-8 wrap to the start of the file
SMALL_CHUNKS = {"COREGPT_ATTENTION_BLOCK": "8", "COREGPT_HEAD_ROWS": "40"}
# W=3 splits batch rows, and K/V groups, between workers (B=4)
RUNS = {"llama-gqa-tied-llama3": [("hybrid", 1, False), ("hybrid", 2, False), ("hybrid", 3, False),
                                  ("hybrid", 4, False), ("data", 2, False), ("data", 4, False),
                                  ("hybrid", 2, True), ("data", 2, True)],
        "qwen2-untied-biases": [("hybrid", 3, False), ("data", 2, False), ("hybrid", 2, True)]}
# the cases whose path a test exercises where the other adds nothing but time
LLAMA, QWEN2 = (pytest.mark.parametrize("case", [name], indirect=True) for name in CASES)


def flags(root, out, *extra):
    return ["train", "--init-from", root / "init", "--data", root / "tokens.bin", "--data-order", "sequential",
            "--batch-size", B, "--seq-len", T, "--steps", STEPS, "--lr", LR, "--lr-schedule", "constant",
            "--warmup", 0, "--weight-decay", WD, "--grad-clip", CLIP, "--threads-per-worker", 1,
            "--eval-every", 0, "--out-dir", out, *extra]


def results(out):
    """A run's (losses, grad norms, final weights)."""
    rows = read_metrics(out)
    weights = load_file(os.path.join(out, "checkpoints", f"step_{STEPS:06d}", "model.safetensors"))
    return ([row["loss"] for row in rows if "loss" in row], [row["grad_norm"] for row in rows if "grad_norm" in row],
            weights)


def train(root, name, *extra, env=SMALL_CHUNKS):
    done = launch(*flags(root, root / name, *extra), env=env)
    assert done.returncode == 0, done.stderr
    return results(root / name)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """-> (name, root with init/ and tokens.bin, the tokens, train_reference's
    (losses, final weights, gradient norms))."""
    root = tmp_path_factory.mktemp(request.param)
    model = hf_model(request.param)
    write_model_dir(root / "init", model)
    tokens = np.random.default_rng(0).integers(0, VOCAB, N_TOKENS).astype(np.uint16)
    write_token_file(root / "tokens.bin", tokens)
    reference = train_reference(model, tokens, B, T, STEPS, LR, WD, CLIP)
    return request.param, root, tokens, reference


def check_against_transformers(run, reference, tied):
    (losses, norms, weights), (expected_losses, expected_weights, expected_norms) = run, reference
    np.testing.assert_allclose(losses, expected_losses, rtol=0, atol=1e-4)
    np.testing.assert_allclose(norms, expected_norms, rtol=2e-5, atol=0)
    expected = {k: v for k, v in expected_weights.items() if not (tied and k == "lm_head.weight")}
    assert set(weights) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(weights[name], value, rtol=0, atol=1e-4, err_msg=name)


@pytest.mark.e2e
def test_training_matches_transformers(case):
    name, root, _, reference = case
    for parallel, workers, recompute in RUNS[name]:
        run = train(root, f"{parallel}{workers}{'-recompute' * recompute}", "--parallel", parallel,
                    "--workers", workers, *(["--recompute"] if recompute else []))
        check_against_transformers(run, reference, CASES[name]["tie_word_embeddings"])


@pytest.mark.e2e
@LLAMA
def test_bf16_within_autocast_error(case):
    """Every loss no further from transformers' fp32 than 1.5x its own bf16 autocast is."""
    name, root, tokens, (fp32, _, _) = case
    autocast = train_reference(hf_model(name), tokens, B, T, STEPS, LR, WD, CLIP, bf16=True)[0]
    for parallel in ("hybrid", "data"):
        losses = train(root, f"bf16-{parallel}", "--precision", "bf16", "--parallel", parallel, "--workers", 2)[0]
        ours, theirs = np.abs(np.subtract(losses, fp32)).max(), np.abs(np.subtract(autocast, fp32)).max()
        assert ours <= 1.5 * theirs, (parallel, ours, theirs)


@pytest.mark.e2e
@QWEN2
def test_resume_is_bit_exact(case):
    name, root, _, _ = case
    whole = train(root, "whole", "--workers", 2, "--ckpt-every", 4)
    done = launch(*flags(root, root / "halves", "--workers", 2, "--steps", 4), env=SMALL_CHUNKS)
    assert done.returncode == 0, done.stderr
    done = launch("train", "--resume", "--out-dir", root / "halves", "--steps", STEPS, env=SMALL_CHUNKS)
    assert done.returncode == 0, done.stderr
    halves = results(root / "halves")
    assert halves[0] == whole[0]
    for key, value in whole[2].items():
        np.testing.assert_array_equal(halves[2][key], value, err_msg=key)


@pytest.mark.system
def test_mpi_two_ranks_match_transformers(case):
    from test_mpi import mpi_launch
    name, root, _, reference = case
    for parallel in ("hybrid", "data"):
        out = root / f"mpi-{parallel}"
        done = mpi_launch(2, *flags(root, out, "--backend", "mpi", "--parallel", parallel, "--workers", 1))
        assert done.returncode == 0, done.stderr
        assert "all 2 ranks hold bit-identical weights" in done.stderr
        check_against_transformers(results(out), reference, CASES[name]["tie_word_embeddings"])


@pytest.mark.parametrize("name", list(CASES))
def test_greedy_sampling_equals_generate(name, tmp_path):
    """32 new tokens, KV-cached a token at a time, past the rope scaling's original context."""
    from trainer.sample import Sampler
    from trainer.weights import load_checked
    model = hf_model(name, seed=3)
    write_model_dir(tmp_path, model)
    cfg, tensors = load_checked(str(tmp_path))
    prompt = [5, 17, 123, 42, 7, 299, 0, 64]
    ours = Sampler(cfg, tensors).generate(prompt, 32, temperature=0, top_k=None, seed=0)
    with torch.no_grad():
        ids = torch.tensor([prompt])  # the mask given: generate would mask the prompt's 0s as padding
        theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                                pad_token_id=0)[0, len(prompt):].tolist()
    assert ours == theirs


def test_sharded_bf16_directories_load_exactly(tmp_path):
    """How the hub ships these models: bf16 tensors in shards named by
    model.safetensors.index.json; read whole (--init-from) and streamed (a LoRA base)."""
    from trainer.base import open_base
    from trainer.weights import load_checked
    model = hf_model("qwen2-untied-biases").to(torch.bfloat16)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    expected = {name: value.float().numpy() for name, value in model.state_dict().items()}
    cfg, tensors = load_checked(str(tmp_path))
    assert cfg.qkv_bias and not cfg.tied and set(tensors) == set(expected)
    streamed = {name: tensor.copy() for name, tensor in open_base(str(tmp_path)).tensors()}
    for name, value in expected.items():
        np.testing.assert_array_equal(tensors[name], value, err_msg=name)
        np.testing.assert_array_equal(streamed[name], value, err_msg=name)


@pytest.mark.parametrize("change, refused", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
    ({"use_sliding_window": True}, "sliding-window attention"),
    ({"num_local_experts": 8}, "mixture of experts"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"attention_bias": True}, "attention_bias (biases beyond Qwen2's q/k/v)"),
    ({"head_dim": 32}, "head_dim 32 other than hidden_size / num_attention_heads"),
    ({"model_type": "mistral"}, None),
])
def test_unbuilt_configs_are_one_line(tmp_path, change, refused):
    import json
    from conftest import launch
    model = hf_model("llama-gqa-tied-llama3")
    write_model_dir(tmp_path / "model", model)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config.update(change)
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    write_token_file(tmp_path / "tokens.bin", np.arange(1000) % VOCAB)
    done = launch("train", "--init-from", tmp_path / "model", "--data", tmp_path / "tokens.bin", "--steps", 1,
                  "--out-dir", tmp_path / "run")
    assert done.returncode == 2
    expected = (f"{tmp_path / 'model' / 'config.json'}: {config['model_type']} config asks for {refused}, which "
                f"coregpt does not train" if refused else
                f"{tmp_path / 'model' / 'config.json'}: model_type 'mistral' is not a family coregpt trains "
                f"(it trains gpt2, llama, qwen2)")
    assert done.stderr.strip().splitlines() == [f"coregpt: error: {expected}"]


@pytest.mark.e2e
@LLAMA
def test_grad_accum_and_8bit_adam(case):
    """--batch-size 2 --grad-accum 2 reads the reference's windows as two micro-batches:
    its numbers within the same bounds; 8-bit AdamW's moments move the weights by a
    fraction of lr a step from AdamW's."""
    name, root, _, reference = case
    tied = CASES[name]["tie_word_embeddings"]
    accumulated = train(root, "accum", "--batch-size", 2, "--grad-accum", 2, "--workers", 2)
    check_against_transformers(accumulated, reference, tied)
    losses, _, weights = train(root, "adamw8bit", "--optim", "adamw8bit", "--workers", 2)
    np.testing.assert_allclose(losses, reference[0], rtol=0, atol=2e-3)
    assert max(np.abs(weights[k] - v).max() for k, v in reference[1].items() if k in weights) < STEPS * LR


@pytest.mark.e2e
def test_export_loads_in_transformers(case, tmp_path):
    """export --format hf: AutoModelForCausalLM loads it from its config.json alone,
    every weight present, and its logits are coregpt's."""
    from transformers import AutoModelForCausalLM
    from trainer.sample import Sampler
    from trainer.weights import load_checked
    name, root, _, _ = case
    train(root, "export-source", "--workers", 2)
    done = launch("export", "--checkpoint", root / "export-source", "--format", "hf", "--out", tmp_path / "hf")
    assert done.returncode == 0, done.stderr
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[CASES[name]["kind"]]
    tokens = list(range(7, 47))
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([tokens])).logits[0, -1].numpy()
    cfg, tensors = load_checked(str(tmp_path / "hf"))
    np.testing.assert_allclose(Sampler(cfg, tensors).forward(tokens, 0), expected, rtol=0, atol=1e-4)


def test_llmc_export_is_refused_in_one_line(tmp_path):
    from conftest import launch
    write_model_dir(tmp_path / "model", hf_model("qwen2-untied-biases"))
    done = launch("export", "--checkpoint", tmp_path / "model", "--format", "llmc", "--out", tmp_path / "x.bin")
    assert done.returncode == 2 and not (tmp_path / "x.bin").exists()
    assert done.stderr.strip().splitlines() == [
        "coregpt: error: --format llmc holds GPT-2 models only; a qwen2 model exports as hf, gguf (or peft, a LoRA "
        "run's adapter)"]


@pytest.mark.parametrize("preset, params", [("smollm2-135m", 134_515_008), ("smollm2-360m", 361_821_120),
                                            ("qwen2.5-0.5b", 494_032_768), ("llama-3.2-1b", 1_235_814_400)])
def test_presets_are_the_published_shapes(preset, params):
    """transformers builds each preset's config.json (on the meta device): the same
    tensors, names and shapes, and the published parameter count."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from trainer.models import param_shapes, preset_config
    cfg = preset_config(preset, {})
    hf = cfg.to_hf()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf))
    theirs = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert dict(param_shapes(cfg)) == theirs
    assert sum(int(np.prod(shape)) for _, shape in param_shapes(cfg)) == params


def test_a_bare_safetensors_needs_its_config(tmp_path):
    from trainer.errors import WeightsError
    from trainer.weights import load_checked
    write_model_dir(tmp_path, hf_model("llama-gqa-tied-llama3"))
    (tmp_path / "config.json").unlink()
    with pytest.raises(WeightsError) as refused:
        load_checked(str(tmp_path / "model.safetensors"))
    assert str(refused.value) == (f"{tmp_path / 'model.safetensors'}: Llama-family weights need their config.json "
                                  f"beside them (their heads and rope are not in the tensors)")
