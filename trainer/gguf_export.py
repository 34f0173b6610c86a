"""export --format gguf: a model as llama.cpp, ollama and LM Studio read it, written
through the `gguf` package: the family's config as llama.cpp's metadata keys, its
tensors under llama.cpp's names and layout (the family's gguf_names module), stored
as f32, f16, bf16 or q8_0 (norms and biases stay f32), and its tokenizer (byte-level
BPE: tokens, types, merges, the pre-tokenizer llama.cpp must split with, BOS/EOS) and
chat template in the metadata."""
import json
import os

import numpy as np

from trainer import gguf_file
from trainer.errors import WeightsError

TYPES = ("f32", "f16", "bf16", "q8_0")
# a probe whose tokens tell the pre-tokenizers apart (digits, contractions, spaces, scripts)
PROBE = "Hello world! It's 2026-12-07: 1234567 tokens… don't\n\n  spaces\tTABS ÜBER café 日本語 ok?!'ll 3.14"
NORMAL, UNUSED = 1, 5  # token types beside gguf_file's CONTROL and USER_DEFINED


def export_gguf(out, cfg, tensors, tokenizer, kind="f32"):
    """Write out (a new file, under a temporary name until complete)."""
    import gguf
    if kind not in TYPES:
        raise WeightsError(f"--type {kind!r}: choose one of {', '.join(TYPES)}")
    if getattr(cfg, "rope_scaling", None):
        raise WeightsError("--format gguf does not write llama3 rope scaling yet (llama.cpp keeps it as a "
                           "rope_freqs tensor); export --format hf")
    if tokenizer is None:
        raise WeightsError("--format gguf needs the model's tokenizer: pass a checkpoint or model that has one")
    names = gguf_file.ARCHITECTURES[cfg.model_type]
    tmp = f"{out}.tmp{os.getpid()}"
    writer = gguf.GGUFWriter(tmp, cfg.model_type)
    try:
        writer.add_name("coregpt export")
        names.write_config(writer, cfg)
        write_vocabulary(writer, cfg, tokenizer)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind])
        for name, gguf_name in names.tensor_names(cfg).items():
            array = names.as_gguf(cfg, name, np.ascontiguousarray(tensors[name], dtype=np.float32))
            data, stored_as = storage(gguf, array, kind)
            writer.add_tensor(gguf_name, data, raw_dtype=stored_as)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


def storage(gguf, array, kind):
    """-> (data, GGML type): matrices as kind (q8_0 where rows hold whole 32-blocks,
    else f16), vectors f32."""
    Q = gguf.GGMLQuantizationType
    if array.ndim == 1 or kind == "f32":
        return array, Q.F32
    if kind == "q8_0" and array.shape[-1] % 32 == 0:
        return gguf.quants.quantize(array, Q.Q8_0), Q.Q8_0
    if kind == "bf16":
        return gguf.quants.quantize(array, Q.BF16), Q.BF16
    return array.astype(np.float16), Q.F16


def write_vocabulary(writer, cfg, tokenizer):
    tokens, types, merges = vocabulary(tokenizer, cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer, tokens, types, merges))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokenizer.eos)
    if tokenizer.bos is not None:
        writer.add_bos_token_id(tokenizer.bos)
    writer.add_add_bos_token(adds_bos(tokenizer))
    template = tokenizer.chat_template()
    if template:
        writer.add_chat_template(template)


def vocabulary(tokenizer, vocab_size):
    """The tokenizer's byte-level BPE -> (the model's vocab_size tokens by id (ids no
    token has: llama.cpp's [PAD{id}], unused), their types, merges "a b")."""
    files = tokenizer.files()
    if "tokenizer.json" not in files:  # GPT-2's own: vocab.json and merges.txt
        with open(files["vocab.json"]) as f:
            vocab = json.load(f)
        with open(files["merges.txt"], encoding="utf-8") as f:
            merges = [line.rstrip("\n") for line in f if line.strip() and not line.startswith("#version")]
        added = [{"id": tokenizer.eos, "content": None, "special": True}]
    else:
        with open(files["tokenizer.json"], encoding="utf-8") as f:
            spec = json.load(f)
        model = spec["model"]
        if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("decoder")):
            raise WeightsError("--format gguf writes byte-level BPE tokenizers only (this one is "
                               f"{model.get('type')})")
        vocab, added = model["vocab"], spec.get("added_tokens") or []
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    size = max([*vocab.values(), *(a["id"] for a in added)]) + 1
    if size > vocab_size:
        raise WeightsError(f"the tokenizer has {size:,} tokens, more than the model's {vocab_size:,}")
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [UNUSED] * vocab_size
    for token, i in vocab.items():
        tokens[i], types[i] = token, NORMAL
    for token in added:
        tokens[token["id"]] = token["content"] or tokens[token["id"]]
        types[token["id"]] = gguf_file.CONTROL if token.get("special") else gguf_file.USER_DEFINED
    return tokens, types, merges


def pre_tokenizer(tokenizer, tokens, types, merges):
    """The name llama.cpp knows the tokenizer's text splitting by: the first of
    gguf_file.SPLITS under which the rebuilt tokenizer tokenizes PROBE as it does."""
    expected = tokenizer.encode(PROBE)[1:] if adds_bos(tokenizer) else tokenizer.encode(PROBE)
    for pre in gguf_file.SPLITS:
        if gguf_file.build_tokenizer(tokens, types, merges, pre).encode(PROBE).ids == expected:
            return pre
    raise WeightsError("--format gguf: the tokenizer splits text in no way llama.cpp names here "
                       f"({', '.join(gguf_file.SPLITS)})")


def adds_bos(tokenizer):
    return tokenizer.bos is not None and tokenizer.encode("a")[:1] == [tokenizer.bos]
