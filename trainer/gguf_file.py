"""GGUF files (llama.cpp's format: what ollama, LM Studio and llama.cpp keep on disk)
as a model to start from, read through the `gguf` package: the config from the
metadata, every tensor dequantized to float32 (F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1,
the K-quants: whatever `gguf` dequantizes) under the family's names (the family's
gguf_names module says how its architecture is stored), and the tokenizer and chat
template from the metadata, written once as a Hugging Face tokenizer directory so a
run carries them like any other model's."""
import collections
import functools
import hashlib
import json
import os

import numpy as np

from trainer import models
from trainer.errors import WeightsError
from trainer.models.gpt2 import gguf_names as gpt2_gguf
from trainer.models.llama import gguf_names as llama_gguf

ARCHITECTURES = {arch: names for names in (gpt2_gguf, llama_gguf) for arch in names.ARCHITECTURES}


def is_gguf(path):
    return str(path).endswith(".gguf")


def open_gguf(path):
    """The file's reader (its tensors memory-mapped while it lives)."""
    try:
        import gguf
    except ImportError:
        raise WeightsError(f"{path}: reading GGUF needs the gguf package: pip install 'coregpt[gguf]'") from None
    try:
        return gguf.GGUFReader(path)
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise WeightsError(f"{path}: not a readable GGUF file ({str(e)[:120]})") from None


@functools.lru_cache(maxsize=4)
def summary(path):
    """-> (metadata {key: value}, {tensor name: (shape as NumPy's, storage type name)}),
    read once; no tensor data stays mapped."""
    reader = open_gguf(path)
    try:
        meta = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise WeightsError(f"{path}: not a readable GGUF file ({str(e)[:120]})") from None
    return meta, {t.name: (tuple(int(n) for n in reversed(t.shape)), t.tensor_type.name) for t in reader.tensors}


def architecture(path):
    """The gguf_names module of the file's general.architecture (one line if not built)."""
    arch = summary(path)[0].get("general.architecture")
    if arch not in ARCHITECTURES:
        raise WeightsError(f"{path}: GGUF architecture {arch!r} is not one coregpt trains "
                           f"({', '.join(ARCHITECTURES)})")
    return arch, ARCHITECTURES[arch]


def read_config(path):
    """The model's config from the file's metadata."""
    meta, tensors = summary(path)
    arch, names = architecture(path)
    hf = names.hf_config(arch, meta, {name: shape for name, (shape, _) in tensors.items()})
    missing = [key for key, value in hf.items() if value is None and not key.endswith("token_id")]
    if missing:
        raise WeightsError(f"{path}: its metadata has no {arch} config field for {', '.join(missing)}")
    return models.family(hf["model_type"]).Config.from_hf(hf)


def tensors(path, cfg):
    """Every parameter of cfg, in layout order, dequantized to float32 -> (name, array)."""
    from gguf.quants import dequantize
    stored = {tensor.name: tensor for tensor in open_gguf(path).tensors}
    names = architecture(path)[1]
    where = names.tensor_names(cfg)
    for name, shape in models.param_shapes(cfg):
        tensor = stored.get(where[name])
        if tensor is None:
            raise WeightsError(f"{path}: tensor {where[name]} ({name}) is missing")
        try:
            array = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        except NotImplementedError:
            raise WeightsError(f"{path}: tensor {tensor.name} is {tensor.tensor_type.name}, which the gguf "
                               f"package cannot dequantize") from None
        array = names.as_transformers(cfg, name, array.reshape(tuple(int(n) for n in reversed(tensor.shape))))
        if array.shape != shape:
            raise WeightsError(f"{path}: tensor {tensor.name} has shape {array.shape}, expected {shape}")
        yield name, array


def load(path):
    """-> (config, {name: float32 array}) of the whole model."""
    cfg = read_config(path)
    return cfg, dict(tensors(path, cfg))


def describe(path):
    """What the header says of the file: the storage types dequantized."""
    counts = collections.Counter(kind for _, kind in summary(path)[1].values())
    return "dequantized to fp32 from " + ", ".join(f"{n} {kind}" for kind, n in counts.most_common())


# how llama.cpp splits text before byte-level BPE, by tokenizer.ggml.pre: its
# regexes, applied in turn (llama.cpp's llama-vocab.cpp)
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {**{pre: (GPT2_SPLIT,) for pre in ("gpt-2", "gpt2")},
          **{pre: (r"\p{N}", GPT2_SPLIT) for pre in ("smollm", "starcoder", "refact", "codeshell", "command-r")},
          **{pre: (LLAMA3_SPLIT,) for pre in ("llama3", "llama-v3", "llama-bpe")},
          **{pre: (QWEN2_SPLIT,) for pre in ("qwen2", "deepseek-r1-qwen")},
          "default": (r"[\p{P}\$\+<=>\^~\|]+", GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")}
WHOLE_WORDS = ("llama3", "llama-v3", "llama-bpe")  # a pre-token in the vocabulary is one token, unmerged
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type
TOKENIZER_FORMAT = 1  # part of the cache key: a change in how tokenizers are written retires old ones


def tokenizer_dir(path):
    """A directory holding the file's tokenizer as tokenizer.json and
    tokenizer_config.json (its special tokens and chat template), written once in
    coregpt's cache for this file (its path, size and time) -> the directory."""
    import shutil
    from trainer.corpus import cache_dir
    stat = os.stat(path)
    source = f"{TOKENIZER_FORMAT}\0{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}"
    directory = os.path.join(cache_dir(), "gguf-tokenizers", hashlib.sha256(source.encode()).hexdigest()[:16])
    if not os.path.isfile(os.path.join(directory, "tokenizer_config.json")):
        partial = f"{directory}.{os.getpid()}.partial"
        os.makedirs(partial, exist_ok=True)
        try:
            write_tokenizer(path, partial)
            os.replace(partial, directory)
        except OSError as e:
            if not os.path.isfile(os.path.join(directory, "tokenizer_config.json")):  # not another process's
                raise WeightsError(f"cannot write {path}'s tokenizer into {directory}: {e.strerror}") from None
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return directory


def write_tokenizer(path, directory):
    """The file's byte-level BPE and chat template as a Hugging Face tokenizer in directory."""
    meta = summary(path)[0]
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if not meta.get("tokenizer.ggml.tokens"):
        raise WeightsError(f"{path}: its metadata holds no tokenizer; pass --tokenizer DIR")
    if kind != "gpt2":
        raise WeightsError(f"{path}: tokenizer model {kind!r} is not built (byte-level BPE, 'gpt2', is)")
    if pre not in SPLITS:
        raise WeightsError(f"{path}: pre-tokenizer {pre!r} is not built ({', '.join(sorted(SPLITS))} are)")
    tokens, types = list(meta["tokenizer.ggml.tokens"]), list(meta.get("tokenizer.ggml.token_type") or ())
    merges = list(meta.get("tokenizer.ggml.merges") or ())
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token")) and bos is not None
    build_tokenizer(tokens, types, merges, pre, bos if add_bos else None).save(
        os.path.join(directory, "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                "bos_token": None if bos is None else tokens[bos], "eos_token": None if eos is None else tokens[eos],
                "chat_template": meta.get("tokenizer.chat_template")}
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump({key: value for key, value in settings.items() if value is not None}, f, indent=2)


def build_tokenizer(tokens, types, merges, pre, bos=None):
    """A `tokenizers` byte-level BPE as llama.cpp runs it: tokens and their types
    (control ones special), merges ("a b"), the pre-tokenizer's splits; BOS first
    when bos (its id) is given."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    tokenizer = Tokenizer(BPE({token: i for i, token in enumerate(tokens)}, pairs, ignore_merges=pre in WHOLE_WORDS))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), "isolated") for split in SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind == CONTROL])
    tokenizer.add_tokens([AddedToken(t, normalized=False) for t, kind in zip(tokens, types) if kind == USER_DEFINED])
    if bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]} $A",
                                                                 special_tokens=[(tokens[bos], bos)])
    return tokenizer
