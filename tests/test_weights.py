"""Weights in: Hugging Face safetensors (dir, bare file, prefixed) and llm.c .bin v3/v5."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY, write_hf_dir
from torch_gpt2 import random_state
from trainer.weights import WeightsError, check_tensors, load_weights

L, C, NH, V, CTX = TINY["n_layer"], TINY["n_embd"], TINY["n_head"], TINY["vocab"], TINY["n_ctx"]


@pytest.fixture(scope="module")
def state():
    return random_state(L, C, V, CTX, seed=2)


def llmc_tensors(state, padded_vocab):
    """llm.c's order and (out, in) layout, from its train_gpt2.c."""
    wte = torch.zeros(padded_vocab, C)
    wte[:V] = state["wte.weight"]
    out = [wte, state["wpe.weight"]]
    stack = lambda name, t=False: torch.stack(  # noqa: E731
        [state[f"h.{i}.{name}"].T if t else state[f"h.{i}.{name}"] for i in range(L)])
    out += [stack("ln_1.weight"), stack("ln_1.bias"), stack("attn.c_attn.weight", True),
            stack("attn.c_attn.bias"), stack("attn.c_proj.weight", True), stack("attn.c_proj.bias"),
            stack("ln_2.weight"), stack("ln_2.bias"), stack("mlp.c_fc.weight", True),
            stack("mlp.c_fc.bias"), stack("mlp.c_proj.weight", True), stack("mlp.c_proj.bias"),
            state["ln_f.weight"], state["ln_f.bias"]]
    return torch.cat([t.reshape(-1) for t in out])


def write_llmc(path, state, version):
    header = np.zeros(256, dtype=np.int32)
    header[:8] = (20240326, version, CTX, V, L, NH, C, 50304)
    flat = llmc_tensors(state, 50304)
    body = flat.numpy() if version == 3 else flat.to(torch.bfloat16).view(torch.int16).numpy()
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(body.tobytes())


@pytest.mark.parametrize("version", [3, 5])
def test_llmc_checkpoint(tmp_path, state, version):
    path = tmp_path / f"model_v{version}.bin"
    write_llmc(path, state, version)
    cfg, tensors = load_weights(str(path))
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (L, NH, C, CTX, V)
    check_tensors(cfg, tensors, path)
    for name, value in state.items():
        expected = value if version == 3 else value.to(torch.bfloat16).float()
        np.testing.assert_array_equal(tensors[name], expected.numpy(), err_msg=name)


def test_llmc_unknown_version(tmp_path, state):
    path = tmp_path / "v9.bin"
    write_llmc(path, state, 3)
    data = bytearray(path.read_bytes())
    data[4:8] = np.int32(9).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="unknown llm.c checkpoint version 9"):
        load_weights(str(path))


def test_hf_directory_and_bare_prefixed_file(tmp_path, state):
    write_hf_dir(tmp_path / "hf", state, L, NH, C, CTX, V)
    cfg, tensors = load_weights(str(tmp_path / "hf"))
    assert cfg.n_head == NH
    for name, value in state.items():
        np.testing.assert_array_equal(tensors[name], value.numpy())
    # bare file, `transformer.` prefix, mask buffers and a tied lm_head: n_head = n_embd/64
    bare = {f"transformer.{k}": v for k, v in state.items()}
    bare["transformer.h.0.attn.bias"] = torch.ones(1, 1, CTX, CTX)
    bare["lm_head.weight"] = state["wte.weight"].clone()
    save_file(bare, tmp_path / "bare.safetensors")
    cfg, tensors = load_weights(str(tmp_path / "bare.safetensors"))
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (L, C // 64, C)
    check_tensors(cfg, tensors, "bare")
    assert "h.0.attn.bias" not in tensors and "lm_head.weight" not in tensors


def test_missing_and_misshapen_tensors_are_named(tmp_path, state):
    broken = dict(state)
    del broken["h.1.mlp.c_fc.bias"]
    write_hf_dir(tmp_path / "missing", broken, L, NH, C, CTX, V)
    cfg, tensors = load_weights(str(tmp_path / "missing"))
    with pytest.raises(WeightsError, match=r"h\.1\.mlp\.c_fc\.bias is missing"):
        check_tensors(cfg, tensors, "missing")
    broken = dict(state, **{"h.0.attn.c_proj.weight": torch.zeros(C, C + 1)})
    write_hf_dir(tmp_path / "shape", broken, L, NH, C, CTX, V)
    cfg, tensors = load_weights(str(tmp_path / "shape"))
    with pytest.raises(WeightsError, match=r"h\.0\.attn\.c_proj\.weight has shape \(64, 65\)"):
        check_tensors(cfg, tensors, "shape")


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "fake.safetensors"
    path.write_bytes(b"not a safetensors file at all, just text")
    with pytest.raises(WeightsError, match="not a readable .safetensors"):
        load_weights(str(path))


def test_checkpoint_config_is_hf_gpt2(tmp_path, state):
    from trainer.models.gpt2 import GPTConfig
    from trainer.weights import save_model
    cfg = GPTConfig(n_layer=L, n_head=NH, n_embd=C, block_size=CTX)
    save_model(str(tmp_path), cfg, {k: v.numpy() for k, v in state.items()})
    hf = json.loads((tmp_path / "config.json").read_text())
    assert hf["model_type"] == "gpt2" and hf["n_head"] == NH and hf["activation_function"] == "gelu_new"
    cfg2, tensors = load_weights(str(tmp_path))
    assert cfg2 == cfg
    for name, value in state.items():
        np.testing.assert_array_equal(tensors[name], value.numpy())
