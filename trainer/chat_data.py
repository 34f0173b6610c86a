"""Chat and instruction data for fine-tuning (`launch prepare --chat FILE.jsonl`).

Each JSONL line is one example: {"messages": [{"role", "content"}, …]} (roles
system, user, assistant), {"prompt", "completion"}, or Alpaca's {"instruction",
"input", "output"}.  An example is rendered with the model's chat template as
transformers' apply_chat_template renders it (trainer/chat.py; the plain template
for a model without one) and tokenized with its special tokens.  Its loss mask
holds 1 on the tokens each assistant message adds to the conversation (the reply
and the end-of-turn the template closes it with), or with loss_on="all" on every
token but the first.  The text is cut where assistant messages begin and end and
each piece tokenized apart, so the mask follows the template exactly.

Examples are packed in order into rows of T tokens (an example that does not fit
the row's room starts the next row, whose rest is padding; one longer than T is
cut to T tokens and counted).  Each token's position counts from its example's
first token, which is what the model embeds and what its attention masks by: a
token attends only to the tokens of its own example (trainer/data.py's files).
"""
import json
import os
from typing import NamedTuple

import numpy as np

from trainer.chat import compile_template, specials_of, template_of
from trainer.data import companion, write_tokens
from trainer.errors import DataError
from trainer.files import atomic_write

ROLES = ("system", "user", "assistant")
LOSS_ON = ("assistant", "all")
VAL_FRACTION = 0.1


def messages_of(row, where):
    """One JSONL row (a dict) -> its messages [{"role", "content"}]."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a line must be a JSON object, not {type(row).__name__}")
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: \"messages\" must be a non-empty list")
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise DataError(f"{where}: each message needs a \"role\" and a string \"content\"")
            if message.get("role") not in ROLES:
                raise DataError(f"{where}: unknown role {message.get('role')!r} (roles: {', '.join(ROLES)})")
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    elif "prompt" in row and "completion" in row:
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    elif "instruction" in row and "output" in row:
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    else:
        raise DataError(f"{where}: a line needs \"messages\", \"prompt\" and \"completion\", or "
                        f"\"instruction\" and \"output\"")
    if not all(isinstance(m["content"], str) for m in messages):
        raise DataError(f"{where}: every prompt, completion, instruction, input and output must be a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message to learn from")
    return messages


def read_jsonl(path):
    """-> [(where, messages)] of every non-blank line (where: "FILE:LINE")."""
    if not os.path.isfile(path):
        raise DataError(f"chat file {path} does not exist")
    examples = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{where}: not valid JSON ({getattr(e, 'msg', e)})") from None
                examples.append((where, messages_of(row, where)))
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


class Renderer:
    """An example's messages -> (tokens, loss mask), by `tokenizer` and its template."""

    def __init__(self, tokenizer, loss_on="assistant"):
        self.tokenizer, self.loss_on = tokenizer, loss_on
        self.render = compile_template(template_of(tokenizer))
        self.specials = specials_of(tokenizer)

    def spans(self, messages, where):
        """-> the whole text and the (start, end) characters each assistant message adds."""
        text, spans = self.render(messages, False, **self.specials), []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], True, **self.specials)
            after = self.render(messages[:i + 1], False, **self.specials)
            if not (text.startswith(after) and after.startswith(before)):
                raise DataError(f"{where}: the chat template does not render the conversation as its "
                                f"turns one after another; it cannot say which tokens are the assistant's")
            spans.append((len(before), len(after)))
        return text, spans

    def example(self, messages, where):
        text, spans = self.spans(messages, where)
        tokens, mask, at = [], [], 0
        for start, end in spans + [(len(text), len(text))]:
            for lo, hi, counts in ((at, start, False), (start, end, True)):
                ids = self.tokenizer.encode_rendered(text[lo:hi]) if hi > lo else []
                tokens += ids
                mask += [counts or self.loss_on == "all"] * len(ids)
            at = end
        if tokens:
            mask[0] = False  # nothing before an example's first token predicts it
        return np.asarray(tokens, dtype=np.int64), np.asarray(mask, dtype=bool)


class Packed(NamedTuple):
    tokens: np.ndarray  # rows·T ids and one more (padding)
    mask: np.ndarray
    positions: np.ndarray
    truncated: int  # examples cut to T tokens


def pack(examples, seq_len, pad):
    """[(tokens, mask)] -> Packed rows of seq_len tokens (see above)."""
    rows, room, truncated = [], 0, 0
    for tokens, mask in examples:
        if tokens.size > seq_len:
            tokens, mask, truncated = tokens[:seq_len], mask[:seq_len], truncated + 1
        if tokens.size > room:
            rows.append([])
            room = seq_len
        rows[-1].append((tokens, mask))
        room -= tokens.size
    n = len(rows) * seq_len + 1
    ids, keep = np.full(n, pad, dtype=np.int64), np.zeros(n, dtype=np.uint16)
    positions = np.zeros(n, dtype=np.int64)
    for r, row in enumerate(rows):
        at = r * seq_len
        for tokens, mask in row + [(np.full(seq_len - sum(t.size for t, _ in row), pad), None)]:
            ids[at:at + tokens.size] = tokens
            keep[at:at + tokens.size] = 0 if mask is None else mask
            positions[at:at + tokens.size] = np.arange(tokens.size)
            at += tokens.size
    return Packed(ids, keep, positions, truncated)


def write_packed(path, packed, vocab_size, seq_len):
    """train.bin and its train.mask.bin and train.pos.bin (trainer/data.py)."""
    write_tokens(path, packed.tokens, vocab_size)
    write_tokens(companion(path, "mask"), packed.mask, 2)
    write_tokens(companion(path, "pos"), packed.positions, seq_len)


def prepare_chat(path, out_dir, tokenizer, seq_len, loss_on="assistant", val_path=None):
    """JSONL examples -> out_dir/train.bin and val.bin (the last 10% of the examples,
    or val_path's) with their companions, and chat.json -> its summary {what: count}."""
    if loss_on not in LOSS_ON:
        raise DataError(f"--loss-on must be one of {', '.join(LOSS_ON)}")
    renderer = Renderer(tokenizer, loss_on)
    train = [renderer.example(messages, where) for where, messages in read_jsonl(path)]
    if val_path:
        val = [renderer.example(messages, where) for where, messages in read_jsonl(val_path)]
    elif len(train) < 2:
        raise DataError(f"{path} holds one example; val.bin needs another (or pass --chat-val FILE)")
    else:
        n_val = max(1, int(len(train) * VAL_FRACTION))
        train, val = train[:-n_val], train[-n_val:]
    pad = tokenizer.eos
    os.makedirs(out_dir, exist_ok=True)
    summary = {"seq_len": seq_len, "loss_on": loss_on}
    for name, examples in (("train", train), ("val", val)):
        packed = pack(examples, seq_len, pad)
        write_packed(os.path.join(out_dir, f"{name}.bin"), packed, tokenizer.vocab_size, seq_len)
        summary[name] = {"examples": len(examples), "truncated": packed.truncated,
                         "rows": (packed.tokens.size - 1) // seq_len,
                         "tokens": int(sum(t.size for t, _ in examples)),
                         "trained_tokens": int(np.count_nonzero(packed.mask))}
    with atomic_write(os.path.join(out_dir, "chat.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def check_packed(path, seq_len):
    """Chat data (a token file with a loss mask beside it) is read in rows of the
    length it was packed for (its directory's chat.json says which)."""
    if not os.path.isfile(companion(path, "mask")):
        return
    try:
        with open(os.path.join(os.path.dirname(path), "chat.json")) as f:
            packed = json.load(f)["seq_len"]
    except (OSError, ValueError, KeyError):
        raise DataError(f"{path} has a loss mask but no readable chat.json beside it (prepare it again)") from None
    if packed != seq_len:
        raise DataError(f"{path} holds chat examples packed into rows of {packed} tokens: use --seq-len "
                        f"{packed}, or prepare it again with --seq-len {seq_len}")
