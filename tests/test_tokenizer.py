"""A model directory's tokenizer.json: `prepare --text FILE --tokenizer DIR` writes
transformers' AutoTokenizer ids for a multilingual text byte for byte (then its EOS),
as uint32 in llm.c's Llama 3 format where the vocabulary passes 65,535; runs carry
the tokenizer in their checkpoints and sample with it; one that does not fit the
model's vocabulary is one line, exit 2."""
import json

import numpy as np
import pytest

from conftest import launch, write_token_file
from llama_reference import hf_model, write_model_dir

LINES = ["The quick brown fox jumps over the lazy dog; 3.14159 and 2,718 are numbers.",
         "Le cœur a ses raisons que la raison ne connaît point. Ça va très bien, merci !",
         "Größere Straßen führen über die Brücke nach Köln — „Anführungszeichen“.",
         "Съешь же ещё этих мягких французских булок, да выпей чаю.",
         "我能吞下玻璃而不伤身体。東京は日本の首都です。",
         "مرحبا بالعالم، هذه جملة عربية قصيرة.",
         "Emoji 🙂🚀 and tabs\tand  double  spaces\n\nnew paragraphs.",
         "def f(x):\n    return x ** 2  # code, too"]
TEXT = "\n".join(f"{i}: {line}" for i in range(12) for line in LINES)  # ~6 KB
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def write_tokenizer(directory, extra_tokens=0):
    """A byte-level BPE trained on TEXT (Llama 3's kind: BOS added by its post-processor),
    with `extra_tokens` added tokens after it, as transformers reads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=600, special_tokens=[BOS, EOS],
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tokenizer.token_to_id(BOS))])
    if extra_tokens:
        tokenizer.add_tokens([f"<extra_{i}>" for i in range(extra_tokens)])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    with open(directory / "tokenizer_config.json", "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS}, f)
    return tokenizer.get_vocab_size(with_added_tokens=True)


def read_tokens(path):
    header = np.fromfile(path, dtype=np.int32, count=256)
    dtype = {20240520: np.uint16, 20240801: np.uint32}[int(header[0])]
    return int(header[0]), int(header[1]), np.fromfile(path, dtype=dtype, offset=1024)


@pytest.mark.e2e
@pytest.mark.parametrize("extra, magic, version", [(0, 20240520, 1), (70000, 20240801, 7)])
def test_prepare_gives_autotokenizer_ids(tmp_path, extra, magic, version):
    from transformers import AutoTokenizer
    vocab = write_tokenizer(tmp_path / "model", extra)
    text = TEXT + (" <extra_69999> and <extra_65536>" if extra else "")
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    done = launch("prepare", "--text", tmp_path / "text.txt", "--tokenizer", tmp_path / "model",
                  "--out", tmp_path / "tokens")
    assert done.returncode == 0, done.stderr
    reference = AutoTokenizer.from_pretrained(tmp_path / "model")
    expected = reference(text).input_ids + [reference.eos_token_id]
    assert expected[0] == reference.bos_token_id and len(text.encode()) > 4000
    train, val = (read_tokens(tmp_path / "tokens" / name) for name in ("train.bin", "val.bin"))
    assert train[:2] == val[:2] == (magic, version)
    assert np.concatenate([train[2], val[2]]).tolist() == expected
    assert max(expected) < vocab and (max(expected) > 65535) == bool(extra)


@pytest.fixture(scope="module")
def model_with_tokenizer(tmp_path_factory):
    """A tiny Llama (vocabulary 300) directory with a 300-token tokenizer beside it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    root = tmp_path_factory.mktemp("tokenized")
    write_model_dir(root / "model", hf_model("llama-gqa-tied-llama3"))
    vocab = {chr(0x100 + i) if i >= 2 else ["<s>", "</s>"][i]: i for i in range(300)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<s>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.save(str(root / "model" / "tokenizer.json"))
    with open(root / "model" / "tokenizer_config.json", "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}, f)
    write_token_file(root / "tokens.bin", np.random.default_rng(0).integers(0, 300, 3000))
    return root


@pytest.mark.e2e
def test_runs_carry_and_sample_with_the_tokenizer(model_with_tokenizer, tmp_path):
    root = model_with_tokenizer
    done = launch("train", "--init-from", root / "model", "--data", root / "tokens.bin", "--steps", 2,
                  "--batch-size", 2, "--seq-len", 16, "--eval-every", 0, "--sample-every", 2,
                  "--out-dir", tmp_path / "run")
    assert done.returncode == 0, done.stderr
    assert "sample:" in done.stderr
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000002"
    assert (checkpoint / "tokenizer.json").read_bytes() == (root / "model" / "tokenizer.json").read_bytes()
    done = launch("sample", "--checkpoint", tmp_path / "run", "--prompt", chr(0x110) * 3,
                  "--max-new-tokens", 5, "--temperature", 0)
    assert done.returncode == 0, done.stderr
    printed = done.stdout.rstrip("\n")
    assert printed.startswith(chr(0x110) * 3) and len(printed) == 8  # one character a token
    done = launch("export", "--checkpoint", tmp_path / "run", "--format", "hf", "--out", tmp_path / "hf")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "hf" / "tokenizer.json").is_file()


@pytest.mark.e2e
def test_a_tokenizer_of_another_model_is_one_line(model_with_tokenizer, tmp_path):
    root = model_with_tokenizer
    write_tokenizer(tmp_path / "big")  # 600 tokens, for a model of 300
    done = launch("train", "--init-from", root / "model", "--data", root / "tokens.bin", "--steps", 1,
                  "--tokenizer", tmp_path / "big", "--out-dir", tmp_path / "run")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"coregpt: error: the tokenizer in {tmp_path / 'big'} has 600 tokens, more than the model's vocabulary "
        f"of 300: it belongs to another model"]
