"""`python -m launch COMMAND ...` (train, prepare, sample, chat, export, eval, plot, sweep);
bare `python -m launch [flags]` trains configs/default.toml.  Errors are one
line on stderr: exit 2 for bad input, 1 for a failed run, 130 / 143 after
Ctrl-C / SIGTERM."""
import dataclasses
import os
import sys

from launch.config import Parser, check, default_config_path, exists, merge, train_parser
from trainer.errors import ConfigError

COMMANDS = {
    "train": "train or fine-tune a model (a fresh run, --init-from weights, or --resume)",
    "prepare": "tokenize a corpus or your own text into token files",
    "sample": "generate text from a run, checkpoint or model",
    "chat": "talk with a model in its chat template, its replies streamed",
    "export": "write weights for transformers (hf), llm.c (llmc), llama.cpp (gguf) or peft",
    "eval": "a model's validation loss and perplexity on a token file",
    "plot": "draw a run's loss curve (RUN/loss.png)",
    "sweep": "measure throughput over workers, threads, strategies and precisions",
}


def version():
    from importlib.metadata import PackageNotFoundError, version as installed
    try:
        return installed("coregpt")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def usage():
    width = max(map(len, COMMANDS))
    return ("usage: python -m launch [COMMAND] [flags]   (or: coregpt [COMMAND] [flags])\n\ncommands:\n"
            + "".join(f"  {name:<{width}}  {text}\n" for name, text in COMMANDS.items())
            + "\nWith no command (or only flags) it trains configs/default.toml.\n"
              "`python -m launch COMMAND --help` lists a command's flags; --version prints the version.")


def prepare_parser():
    p = Parser(prog="launch prepare", description="Tokenize a corpus into llm.c token files "
               "(train.bin, val.bin: the last 10% of tokens).")
    p.add_argument("corpus", nargs="?", choices=["shakespeare"], help="a named corpus")
    p.add_argument("--text", help="a UTF-8 text file to tokenize instead")
    p.add_argument("--chat", help="a JSONL file of chats or instructions to render with the model's chat template, "
                   "mask and pack into rows of --seq-len tokens (docs/chat.md)")
    p.add_argument("--chat-val", help="with --chat: a JSONL file for val.bin (default: the last 10%% of --chat)")
    p.add_argument("--seq-len", type=int, default=1024, help="with --chat: the rows' length, the --seq-len to train at")
    p.add_argument("--loss-on", choices=["assistant", "all"], default="assistant",
                   help="with --chat: the tokens the loss counts (default: the assistant's replies)")
    p.add_argument("--tokenizer", help="a model directory (or run, or GGUF file) whose tokenizer tokenizes --text "
                   "(a Llama-family model's; default GPT-2's BPE); ids above 65,535 are written as uint32")
    p.add_argument("--out", help="output directory (default: the coregpt cache, or TEXT's name)")
    return p


class Session:
    """The MPI group of this process, once there is one (errors are reported by it)."""
    group = None


def mpi_world_size():
    """Ranks started by mpiexec (MPICH's PMI, or Open MPI), from the environment."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def cmd_train(argv):
    args = vars(train_parser().parse_args(argv))
    config = args.pop("config", None)
    settings = merge(config, args)
    if settings.resume and "backend" not in args and settings.out_dir:
        from trainer.checkpoint import saved_setting
        settings = dataclasses.replace(settings, backend=saved_setting(settings.out_dir, "backend")
                                       or settings.backend)
    if settings.backend == "shm" and mpi_world_size() > 1:
        raise ConfigError(f"started by mpiexec as {mpi_world_size()} ranks with --backend shm, which "
                          f"would train {mpi_world_size()} separate copies; pass --backend mpi")
    from workers.comm import make_group
    Session.group = make_group(settings.backend)
    settings = check(settings, Session.group if settings.backend == "mpi" else None)
    from launch.train import train
    train(settings, given=set(args), group=Session.group)
    return 0


def cmd_prepare(argv):
    from trainer.corpus import prepare_shakespeare, prepare_text
    from trainer.tokenizer import HFTokenizer, find_tokenizer, gpt2_tokenizer
    args = prepare_parser().parse_args(argv)
    if sum(map(bool, (args.corpus, args.text, args.chat))) != 1:
        raise ConfigError("prepare takes one of 'shakespeare', --text FILE or --chat FILE.jsonl")
    if args.corpus:
        print(prepare_shakespeare(gpt2_tokenizer(), args.out))
        return 0
    source = args.text or args.chat
    out = args.out or os.path.splitext(os.path.basename(source))[0] + "_tokens"
    tokenizer = gpt2_tokenizer()
    if args.tokenizer:
        directory = find_tokenizer(args.tokenizer) if os.path.exists(args.tokenizer) else None
        if directory is None:
            raise ConfigError(f"--tokenizer {args.tokenizer} holds no tokenizer.json")
        tokenizer = HFTokenizer(directory)
    if args.chat:
        return prepare_chat_data(args, out, tokenizer)
    train, val = prepare_text(args.text, out, tokenizer)
    print(f"{out}: {train} train tokens, {val} val tokens")
    return 0


def prepare_chat_data(args, out, tokenizer):
    from trainer.chat_data import prepare_chat
    if args.seq_len < 2:
        raise ConfigError("--seq-len must be at least 2")
    summary = prepare_chat(args.chat, out, tokenizer, args.seq_len, args.loss_on, args.chat_val)
    for name in ("train", "val"):
        part = summary[name]
        print(f"{out}/{name}.bin: {part['examples']} examples ({part['truncated']} cut to {args.seq_len} tokens) "
              f"in {part['rows']} rows of {args.seq_len}: {part['tokens']} tokens, {part['trained_tokens']} "
              f"of them trained on ({args.loss_on})")
    print(f"train with --data {out} --seq-len {args.seq_len}")
    return 0


def sample_parser():
    p = Parser(prog="launch sample", description="Generate text from a model (KV-cached).")
    p.add_argument("--checkpoint", required=True, help="anything --init-from takes")
    p.add_argument("--prompt", default="", help="text to continue (default: <|endoftext|>)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate after the prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=40, help="0 keeps the whole vocabulary")
    p.add_argument("--tokenizer", help="a directory holding the model's tokenizer.json (default: the one beside "
                   "--checkpoint; GPT-2 has its own)")
    p.add_argument("--seed", type=int, default=1337, help="of the sampling (the same seed, the same text)")
    return p


def cmd_sample(argv):
    args = sample_parser().parse_args(argv)
    if args.max_new_tokens < 0 or args.temperature < 0 or args.top_k < 0:
        raise ConfigError("--max-new-tokens, --temperature and --top-k must not be negative")
    exists(args.checkpoint)
    from trainer.base import load_model
    from trainer.sample import sample_text
    from trainer.tokenizer import tokenizer_of
    cfg, tensors = load_model(args.checkpoint)  # a LoRA run's: its base with the adapter merged
    tokenizer = tokenizer_of(cfg, args.checkpoint, args.tokenizer)
    text = sample_text(cfg, tensors, tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                       args.top_k, args.seed)
    print(args.prompt + text)
    return 0


def export_parser():
    p = Parser(prog="launch export", description="Export weights for transformers, llm.c or llama.cpp, or a LoRA "
               "run's adapter for peft.")
    p.add_argument("--checkpoint", required=True, help="a run, a checkpoint, or anything --init-from takes")
    p.add_argument("--format", required=True, help="hf (a transformers model directory), llmc (GPT-2's v3 fp32 .bin), "
                   "gguf (llama.cpp's file, with the tokenizer and chat template) or peft (a LoRA run's adapter, for "
                   "PeftModel.from_pretrained); hf, llmc and gguf merge an adapter")
    p.add_argument("--type", default="f32", help="how --format gguf stores the matrices: f32, f16, bf16 or q8_0")
    p.add_argument("--out", required=True, help="output directory (hf) or file (llmc, gguf); must not exist")
    return p


def cmd_export(argv):
    args = export_parser().parse_args(argv)
    exists(args.checkpoint)
    from trainer.base import Adapted, adapter_dir, load_model
    from trainer.export import FORMATS, export, export_peft
    formats = (*FORMATS, "peft")
    if args.format not in formats:
        raise ConfigError(f"unknown --format {args.format!r}; choose one of {', '.join(formats)}")
    if args.format == "peft":
        directory = adapter_dir(args.checkpoint)
        if directory is None:
            raise ConfigError(f"--format peft exports a LoRA adapter; {args.checkpoint} is not a LoRA run or adapter")
        print(export_peft(Adapted(directory), args.out))
        return 0
    from trainer.tokenizer import known_tokenizer
    cfg, tensors = load_model(args.checkpoint)
    print(export(cfg, tensors, args.format, args.out, known_tokenizer(cfg, args.checkpoint), args.type))
    return 0


def eval_parser():
    p = Parser(prog="launch eval", description="Mean validation loss (nats per token) and perplexity of a "
               "model on token data, read in windows of --batch-size x --seq-len as a run evaluates.")
    p.add_argument("--checkpoint", required=True, help="a run (its latest checkpoint), a checkpoint, or anything "
                   "--init-from takes")
    p.add_argument("--data", required=True, help="a prepared directory (its val.bin), 'shakespeare', or a token file")
    p.add_argument("--batch-size", type=int, default=8, help="rows per window")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per row (at most the model's context)")
    p.add_argument("--windows", type=int, default=0, help="windows to read (0: every whole window of the file)")
    return p


def cmd_eval(argv):
    args = eval_parser().parse_args(argv)
    if args.batch_size < 1 or args.seq_len < 1 or args.windows < 0:
        raise ConfigError("--batch-size and --seq-len must be at least 1, --windows not negative")
    exists(args.checkpoint)
    from trainer.base import load_model
    from trainer.chat_data import check_packed
    from trainer.data import check_tokens, open_data
    from trainer.evaluate import mean_loss, perplexity
    path = evaluation_file(args.data)
    cfg, tensors = load_model(args.checkpoint)
    if args.seq_len > cfg.block_size:
        raise ConfigError(f"--seq-len {args.seq_len} is above the model's context of {cfg.block_size}")
    check_packed(path, args.seq_len)
    data = open_data(path)
    check_tokens(data.tokens, path, args.batch_size * args.seq_len, cfg.vocab_size)
    loss, windows = mean_loss(cfg, tensors, data, args.batch_size, args.seq_len, args.windows)
    print(f"{path}: val loss {loss:.4f}, perplexity {perplexity(loss):.2f} "
          f"({windows} windows of {args.batch_size}x{args.seq_len} tokens)")
    return 0


def evaluation_file(spec):
    """eval's --data -> the token file it reads: a prepared directory's (or the corpus's)
    val.bin, or the token file named."""
    from trainer.corpus import prepare_shakespeare
    from trainer.data import resolve_data
    from trainer.tokenizer import gpt2_tokenizer
    train, val = resolve_data(spec, lambda: prepare_shakespeare(gpt2_tokenizer()))
    if train == spec:
        return spec
    if val is None:
        raise ConfigError(f"--data {spec} has no val.bin; pass the token file to evaluate on")
    return val


def plot_parser():
    p = Parser(prog="launch plot", description="Write RUN/loss.png from RUN/metrics.jsonl.")
    p.add_argument("run", help="a run directory")
    return p


def cmd_plot(argv):
    args = plot_parser().parse_args(argv)
    if not os.path.isfile(os.path.join(args.run, "metrics.jsonl")):
        raise ConfigError(f"{args.run} is not a run directory (no metrics.jsonl)")
    from trainer.plot import plot_run
    print(plot_run(args.run))
    return 0


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if sys.platform == "win32":
        return fail("coregpt runs on Linux and macOS; on Windows, run it inside WSL "
                    "(the Windows Subsystem for Linux)", 2)
    if argv[:1] == ["--version"]:
        print(f"coregpt {version()}")
        return 0
    if not argv:
        print(f"coregpt: no command given: training {default_config_path()} "
              f"(`python -m launch --help` lists the commands)", file=sys.stderr)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["train", "--config", default_config_path()] + argv
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        return fail(f"unknown command {command!r}; choose one of {', '.join(COMMANDS)}", 2)
    from launch.loop import Interrupted
    from trainer.errors import DataError, ResourceError, RunError, WeightsError, WorkerError
    try:
        from launch.chat import cmd_chat
        from launch.sweep import sweep
        commands = {"train": cmd_train, "prepare": cmd_prepare, "sample": cmd_sample, "chat": cmd_chat,
                    "export": cmd_export, "eval": cmd_eval, "plot": cmd_plot, "sweep": sweep}
        return commands[command](rest)
    except (ConfigError, DataError, WeightsError, ResourceError) as e:
        # the same on every rank (settings) or already agreed by all ranks (setup)
        group = Session.group
        root = group.is_root if group is not None else os.environ.get("PMI_RANK", "0") == "0"
        return fail(str(e), 2) if root else 2
    except (WorkerError, RunError) as e:
        group = Session.group
        where = f"rank {group.rank}: " if group is not None and group.size > 1 else ""
        code = fail(where + str(e), 1)
        if group is not None and group.size > 1:
            group.abort(code)  # the other ranks would wait for us forever
        return code
    except Interrupted as e:
        if Session.group is None or Session.group.is_root:
            print(f"coregpt: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return fail("interrupted", 130)


def console():
    """The `coregpt` command: the same CLI as `python -m launch`."""
    sys.exit(main())


def fail(message, code):
    print(f"coregpt: error: {message}", file=sys.stderr)
    return code
