"""A model's tokenizer: GPT-2's BPE through tiktoken (offline, trainer/corpus.py), or
a model directory's own tokenizer.json through Hugging Face `tokenizers` (the Llama
family's: SmolLM2, Qwen2.5, Llama 3 each bring theirs).  Both say how a document is
written into a token file: GPT-2's <|endoftext|> before each document; a
tokenizer.json's own encoding (its post-processor adds BOS where the model wants
one, as transformers' AutoTokenizer does) followed by its EOS.  Runs copy the
tokenizer files into every checkpoint, so a checkpoint is a whole Hugging Face
model directory."""
import json
import os

from trainer.errors import DataError

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


class GPT2Tokenizer:
    """tiktoken's GPT-2 BPE; documents are <|endoftext|> + their tokens."""

    def __init__(self, family):
        self.family = family
        self.start = self.bos = self.eos = family.EOT
        self.vocab_size = family.VOCAB

    @property
    def encoding(self):
        """Read on first use (then cached): a run that never samples never reads the BPE."""
        return self.family.tokenizer()

    def encode(self, text, specials=True):
        return self.encoding.encode_ordinary(text)

    def encode_rendered(self, text):
        """A chat template's output: <|endoftext|> in it is the token."""
        return self.encoding.encode(text, allowed_special={"<|endoftext|>"})

    def token_id(self, token):
        return self.eos if token == "<|endoftext|>" else None

    def chat_template(self):
        return None  # GPT-2 has none (trainer/chat.py's plain one serves)

    def decode(self, ids):
        return self.encoding.decode(ids)

    def document(self, text):
        return [self.eos] + self.encode(text)

    def files(self):
        """{file name in a Hugging Face directory: path} that transformers reads it from."""
        return self.family.tokenizer_files()

    def carried(self):
        """What checkpoints copy of it: nothing, it is built in."""
        return {}

    def describe(self):
        """The header's line on it (None: nothing to say)."""
        return None


def gpt2_tokenizer():
    from trainer.models import gpt2
    return GPT2Tokenizer(gpt2)


class HFTokenizer:
    """directory/tokenizer.json; BOS and EOS as its tokenizer_config.json (or the
    model's config.json) names them."""

    def __init__(self, directory):
        from tokenizers import Tokenizer
        path = os.path.join(directory, "tokenizer.json")
        try:
            self.tokenizer = Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 - tokenizers raises its own Exception type
            raise DataError(f"{path}: not a readable tokenizer.json ({str(e).splitlines()[0][:120]})") from None
        self.directory = directory
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.bos, self.eos = (self.special(kind) for kind in ("bos", "eos"))
        if self.eos is None:
            raise DataError(f"{directory}: no eos_token in tokenizer_config.json nor eos_token_id in config.json")
        self.start = self.eos if self.bos is None else self.bos  # what a sample without a prompt starts from

    def special(self, kind):
        """The id of the bos or eos token, or None."""
        settings = read_json(os.path.join(self.directory, "tokenizer_config.json"))
        token = settings.get(f"{kind}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and self.tokenizer.token_to_id(token) is not None:
            return self.tokenizer.token_to_id(token)
        found = read_json(os.path.join(self.directory, "config.json")).get(f"{kind}_token_id")
        found = found[0] if isinstance(found, list) and found else found
        return found if isinstance(found, int) else None

    def encode(self, text, specials=True):
        """ids of text; specials: with what the post-processor adds (BOS where the model wants it)."""
        return self.tokenizer.encode(text, add_special_tokens=specials).ids

    def encode_rendered(self, text):
        """A chat template's output: its special tokens are tokens, nothing is added
        (the template writes BOS where the model wants one), as apply_chat_template."""
        return self.encode(text, specials=False)

    def token_id(self, token):
        return self.tokenizer.token_to_id(token)

    def chat_template(self):
        """tokenizer_config.json's chat_template (a string), else chat_template.jinja's
        (where transformers saves it since 4.43), or None."""
        template = read_json(os.path.join(self.directory, "tokenizer_config.json")).get("chat_template")
        if isinstance(template, str):
            return template
        path = os.path.join(self.directory, "chat_template.jinja")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return f.read()
        return None

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def document(self, text):
        return self.encode(text) + [self.eos]

    def files(self):
        return {name: os.path.join(self.directory, name) for name in FILES
                if os.path.isfile(os.path.join(self.directory, name))}

    carried = files  # every checkpoint is a whole Hugging Face model directory

    def describe(self):
        return (f"tokenizer {os.path.join(self.directory, 'tokenizer.json')} ({self.vocab_size:,} tokens), "
                f"copied into each checkpoint")


def read_json(path):
    try:
        with open(path) as f:
            found = json.load(f)
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def find_tokenizer(source):
    """The directory holding the tokenizer.json of the model `source` names (a model
    directory, a run (its latest checkpoint) or checkpoint, a file's own folder, a
    LoRA adapter's base, a GGUF file's metadata written out), or None."""
    from trainer import gguf_file
    from trainer.weights import checkpoint_dir, pointed
    source = pointed(str(source))
    if gguf_file.is_gguf(source) and os.path.isfile(source):  # the tokenizer in its metadata
        return gguf_file.tokenizer_dir(source)
    directory = checkpoint_dir(source) if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    if os.path.isfile(os.path.join(directory, "tokenizer.json")):
        return directory
    base = read_json(os.path.join(directory, "adapter_config.json")).get("base_model_name_or_path")
    return find_tokenizer(base) if isinstance(base, str) and os.path.exists(base) else None


def known_tokenizer(cfg, source=None):
    """tokenizer_of(cfg, source) where the model has one (GPT-2's, or a tokenizer.json
    beside source), else None."""
    return tokenizer_of(cfg, source) if cfg.family.BUILTIN_TOKENIZER or (source and find_tokenizer(source)) else None


def tokenizer_of(cfg, source=None, directory=None):
    """The tokenizer of the model `cfg`: GPT-2's own, or the tokenizer.json in
    `directory` (else the one beside `source`, see find_tokenizer).  One whose
    vocabulary is larger than the model's is refused."""
    family = cfg.family
    if family.BUILTIN_TOKENIZER:  # GPT-2's BPE, whatever directory it came from
        return GPT2Tokenizer(family)
    directory = directory or (source and find_tokenizer(source))
    if not directory:
        raise DataError(f"{source or 'the model'} has no tokenizer.json beside it; pass --tokenizer DIR "
                        f"(a model directory holding one)")
    tokenizer = HFTokenizer(directory)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise DataError(f"the tokenizer in {directory} has {tokenizer.vocab_size:,} tokens, more than the "
                        f"model's vocabulary of {cfg.vocab_size:,}: it belongs to another model")
    return tokenizer
