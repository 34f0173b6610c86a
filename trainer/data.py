"""llm.c token files and the batch order.

A token file is 256 int32 header words (magic, version, token count) followed by
the tokens: llm.c's GPT-2 format (magic 20240520, version 1) holds them as uint16,
its Llama 3 format (magic 20240801, version 7) as uint32, for vocabularies above
65,536.  The file holds W = (n − 1) // (B·T)
windows of B·T+1 tokens (each window's last token is the next one's first).
Micro-batch w reads window w mod W: in file order (`sequential`, llm.c's: window
w starts at token (w mod W)·B·T), or in the order of a permutation of the W
windows drawn for each pass over the file (epoch w // W) from the run's seed
(`shuffled`, the default).  Every worker and MPI rank draws the same one.

Chat data (trainer/chat_data.py) adds two files of the same length beside a token
file, in the same format: NAME.mask.bin, 1 where a token is a target the loss
counts, and NAME.pos.bin, each token's position in its example (positions restart
at each example, and each example attends only to its own tokens).
"""
import os
from typing import NamedTuple

import numpy as np

from trainer.errors import DataError
from trainer.files import atomic_write

MAGIC, VERSION, HEADER_BYTES = 20240520, 1, 256 * 4
WIDE_MAGIC, WIDE_VERSION = 20240801, 7  # llm.c's Llama 3 files
FORMATS = {MAGIC: (VERSION, np.uint16), WIDE_MAGIC: (WIDE_VERSION, np.uint32)}


def write_tokens(path, tokens, vocab_size=1 << 16):
    """Atomically write an llm.c token file (temp name, fsync, rename): uint16 ids in
    the GPT-2 format where the vocabulary fits them, else uint32 in the Llama 3 one."""
    tokens = np.asarray(tokens)
    magic = MAGIC if vocab_size <= 1 << 16 else WIDE_MAGIC
    version, dtype = FORMATS[magic]
    if tokens.size and (tokens.min() < 0 or tokens.max() >= min(vocab_size, np.iinfo(dtype).max + 1)):
        raise DataError(f"{path}: token ids must be below the vocabulary's {vocab_size}")
    header = np.zeros(256, dtype=np.int32)
    header[:3] = (magic, version, tokens.size)
    with atomic_write(path) as f:
        f.write(header.tobytes())
        f.write(tokens.astype(dtype).tobytes())


def looks_like_text(path):
    """The first KB of the file decodes as UTF-8 without control characters."""
    with open(path, "rb") as f:
        text = f.read(1024).decode("utf-8", errors="replace")  # a token file's header has NUL bytes
    return all(c.isprintable() or c in "\n\r\t" for c in text)


def open_tokens(path):
    """Memory-map a token file after checking its header -> uint16 array."""
    if not os.path.isfile(path):
        raise DataError(f"token file {path} does not exist (run `python -m launch prepare` first)")
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise DataError(f"{path} is not an llm.c token file: {size} bytes is shorter than the header")
    header = np.fromfile(path, dtype=np.int32, count=256)
    if header[0] not in FORMATS:
        raise DataError(f"{path} is not an llm.c token file: magic {header[0]}, expected {MAGIC} "
                        f"(or {WIDE_MAGIC})"
                        + (f" (a text file? tokenize it first: python -m launch prepare --text {path})"
                           if looks_like_text(path) else ""))
    version, dtype = FORMATS[int(header[0])]
    if header[1] != version:
        raise DataError(f"{path}: unsupported token file version {header[1]}, expected {version}")
    count, width = int(header[2]), np.dtype(dtype).itemsize
    if count <= 0:
        raise DataError(f"{path} holds no tokens")
    if HEADER_BYTES + width * count > size:
        raise DataError(f"{path} is truncated: header says {count} tokens, "
                        f"file holds {(size - HEADER_BYTES) // width}")
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))


class TokenData(NamedTuple):
    """A token file and, for chat data, its loss mask and positions (else None)."""
    tokens: np.ndarray
    mask: np.ndarray | None = None
    positions: np.ndarray | None = None

    def window(self, start, n):
        """n tokens from `start` -> (their ids and the one after, which targets count
        (None: all), their positions (None: row order))."""
        tokens = self.tokens[start:start + n + 1]
        if self.mask is None:
            return tokens, None, None
        return tokens, self.mask[start + 1:start + n + 1], self.positions[start:start + n]

    def targets(self, start, n):
        """How many of window (start, n)'s targets the loss counts."""
        return n if self.mask is None else int(np.count_nonzero(self.mask[start + 1:start + n + 1]))


def companion(path, what):
    """train.bin -> train.mask.bin (what = "mask"), train.pos.bin ("pos")."""
    stem = path[:-4] if path.endswith(".bin") else path
    return f"{stem}.{what}.bin"


def open_data(path):
    """A token file and its chat companions, where they exist -> TokenData."""
    tokens = open_tokens(path)
    if not os.path.isfile(companion(path, "mask")):
        return TokenData(tokens)
    mask, positions = (open_tokens(companion(path, what)) for what in ("mask", "pos"))
    if not mask.size == positions.size == tokens.size:
        raise DataError(f"{path}: its .mask.bin and .pos.bin hold {mask.size} and {positions.size} values "
                        f"for {tokens.size} tokens (prepare it again)")
    return TokenData(tokens, mask, positions)


def check_tokens(tokens, path, batch_tokens, vocab_size):
    """Reject files too short for one batch or holding ids outside the vocabulary."""
    if tokens.size < batch_tokens + 1:
        raise DataError(f"{path} holds {tokens.size} tokens, fewer than one batch needs "
                        f"({batch_tokens + 1}); use a smaller --batch-size or --seq-len")
    top = int(tokens.max())
    if top >= vocab_size:
        raise DataError(f"{path} holds token id {top}, outside the model's vocabulary of {vocab_size}")


ORDERS = ("shuffled", "sequential")


def order_seed(data_order, seed):
    """--data-order and --seed -> WindowOrder's seed."""
    return seed if data_order == "shuffled" else None


class WindowOrder:
    """Which window of a file of n_tokens each micro-batch reads (see above);
    seed None: file order."""

    def __init__(self, n_tokens, batch_tokens, seed=None):
        self.per_pass, self.batch_tokens, self.seed = (n_tokens - 1) // batch_tokens, batch_tokens, seed
        self.epoch, self.permutation = None, None  # the last epoch's, drawn once

    def start(self, window):
        """First token of micro-batch `window` (0-based)."""
        epoch, index = divmod(window, self.per_pass)
        if self.seed is not None:
            if epoch != self.epoch:
                self.epoch = epoch
                self.permutation = np.random.default_rng([self.seed, 0xDA7A, epoch]).permutation(self.per_pass)
            index = int(self.permutation[index])
        return index * self.batch_tokens


def resolve_data(spec, prepare_shakespeare):
    """--data: 'shakespeare', a prepared directory, or a token file -> (train, val or None)."""
    if spec == "shakespeare":
        directory = prepare_shakespeare()
        return os.path.join(directory, "train.bin"), os.path.join(directory, "val.bin")
    if os.path.isdir(spec):
        train, val = os.path.join(spec, "train.bin"), os.path.join(spec, "val.bin")
        if not os.path.isfile(train):
            raise DataError(f"data directory {spec} has no train.bin (run `python -m launch prepare`)")
        return train, val if os.path.isfile(val) else None
    if not os.path.exists(spec):
        raise DataError(f"data {spec} does not exist: pass 'shakespeare', a prepared directory or a token file")
    return spec, None
