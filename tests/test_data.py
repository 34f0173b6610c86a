"""Tokenizer offline, corpus preparation, token files and the batch order."""
import numpy as np
import pytest

from conftest import launch, write_token_file
from trainer.corpus import gpt2_encoding
from trainer.data import DataError, WindowOrder, open_tokens


def test_gpt2_bpe_offline():
    enc = gpt2_encoding()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.n_vocab == 50257
    text = "To be, or not to be: that is the question.\n"
    assert enc.decode(enc.encode(text)) == text


@pytest.mark.e2e
def test_prepare_shakespeare_offline(tmp_path):
    done = launch("prepare", "shakespeare", env={"XDG_CACHE_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    directory = tmp_path / "coregpt" / "shakespeare"
    assert done.stdout.strip() == str(directory)
    train, val = open_tokens(directory / "train.bin"), open_tokens(directory / "val.bin")
    total = train.size + val.size
    assert 1_500_000 < total < 1_650_000  # DESIGN.md: ≈1.57M GPT-2 tokens
    assert val.size == int(total * 0.1)
    assert train[0] == 50256  # every play starts with <|endoftext|>
    head = gpt2_encoding().decode(train[1:40].tolist())
    assert "Shakespeare" in head
    again = launch("prepare", "shakespeare", env={"XDG_CACHE_HOME": str(tmp_path)})
    assert again.returncode == 0 and "downloading" not in again.stderr  # cached


@pytest.mark.e2e
def test_prepare_text_split(tmp_path):
    text = tmp_path / "story.txt"
    text.write_text("Once upon a time there was a tiny GPT. " * 50, encoding="utf-8")
    done = launch("prepare", "--text", text, "--out", tmp_path / "story")
    assert done.returncode == 0, done.stderr
    train, val = open_tokens(tmp_path / "story" / "train.bin"), open_tokens(tmp_path / "story" / "val.bin")
    expected = [50256] + gpt2_encoding().encode("Once upon a time there was a tiny GPT. " * 50)
    assert list(train) + list(val) == expected
    assert val.size == int(len(expected) * 0.1)


def test_token_file_checks(tmp_path):
    good = tmp_path / "good.bin"
    write_token_file(good, np.arange(100))
    assert list(open_tokens(good)[:3]) == [0, 1, 2]
    bad_magic = tmp_path / "magic.bin"
    bad_magic.write_bytes(b"\0" * 2048)
    with pytest.raises(DataError, match="magic"):
        open_tokens(bad_magic)
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated"):
        open_tokens(truncated)
    with pytest.raises(DataError, match="does not exist"):
        open_tokens(tmp_path / "missing.bin")


def test_llama3_token_files_hold_uint32(tmp_path):
    """Vocabularies above 65,536 (Llama 3's 128,256) take llm.c's Llama 3 format: the
    header magic 20240801, version 7, the count, then uint32 ids; GPT-2's stay uint16."""
    from trainer.data import write_tokens
    ids = np.array([0, 65535, 65536, 128255, 7])
    wide = tmp_path / "wide.bin"
    write_tokens(wide, ids, vocab_size=128256)
    raw = wide.read_bytes()
    assert list(np.frombuffer(raw[:12], dtype="<i4")) == [20240801, 7, 5] and len(raw) == 1024 + 4 * 5
    assert list(np.frombuffer(raw[1024:], dtype="<u4")) == list(ids)
    assert list(open_tokens(wide)) == list(ids) and open_tokens(wide).dtype == np.uint32
    narrow = tmp_path / "narrow.bin"
    write_tokens(narrow, [50256, 1], vocab_size=50257)
    assert list(np.frombuffer(narrow.read_bytes()[:12], dtype="<i4")) == [20240520, 1, 2]
    assert len(narrow.read_bytes()) == 1024 + 2 * 2
    with pytest.raises(DataError, match="below the vocabulary's 50257"):
        write_tokens(tmp_path / "bad.bin", [50257], vocab_size=50257)
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(raw[:-6])
    with pytest.raises(DataError, match="header says 5 tokens, file holds 3"):
        open_tokens(truncated)


def test_window_order_wraps_before_running_past_the_end():
    n, bt = 5 * 12 + 7, 12
    starts = [WindowOrder(n, bt).start(s) for s in range(8)]  # file order (--data-order sequential)
    assert starts == [0, 12, 24, 36, 48, 0, 12, 24]
    # a window whose B·T+1 tokens end exactly at the file's end is still used
    assert [WindowOrder(3 * bt + 1, bt).start(s) for s in range(4)] == [0, 12, 24, 0]
