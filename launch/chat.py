"""`python -m launch chat --checkpoint SRC`: talk with a model in the terminal, in its
chat template, its replies streamed as they are sampled (trainer/chat.py).  Reads
stdin a line a message; at a terminal it prompts, Ctrl-D (or end of input) ends the
conversation with exit 0."""
import sys

from launch.config import Parser, exists
from trainer.errors import ConfigError


def chat_parser():
    p = Parser(prog="launch chat", description="Chat with a model in its chat template (KV-cached, streamed).")
    p.add_argument("--checkpoint", required=True, help="a run, a checkpoint, or anything --init-from takes (a "
                   "model directory, a GGUF file)")
    p.add_argument("--system", help="a system message to start the conversation with")
    p.add_argument("--temperature", type=float, default=0.7, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=40, help="0 keeps the whole vocabulary")
    p.add_argument("--top-p", type=float, default=0.9, help="sample within the tokens of this much probability")
    p.add_argument("--max-new-tokens", type=int, default=256, help="the longest reply")
    p.add_argument("--context", type=int, default=2048, help="tokens of conversation kept (at most the model's)")
    p.add_argument("--tokenizer", help="a directory holding the model's tokenizer.json (default: the model's own)")
    p.add_argument("--seed", type=int, default=1337, help="of the sampling (the same seed, the same replies)")
    return p


def cmd_chat(argv):
    args = chat_parser().parse_args(argv)
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1 \
            or args.context < 2:
        raise ConfigError("--temperature and --top-k must not be negative, --top-p in (0, 1], "
                          "--max-new-tokens at least 1, --context at least 2")
    exists(args.checkpoint)
    from trainer.base import load_model
    from trainer.chat import Chat, chooser, template_of
    from trainer.tokenizer import tokenizer_of
    cfg, tensors = load_model(args.checkpoint)  # a LoRA run's: its base with the adapter merged
    tokenizer = tokenizer_of(cfg, args.checkpoint, args.tokenizer)
    chat = Chat(cfg, tensors, tokenizer, template_of(tokenizer), args.context)
    if args.system:
        chat.say("system", args.system)
    choose = chooser(args.temperature, args.top_k, args.top_p, args.seed)
    at_terminal = sys.stdin.isatty()
    try:
        while True:
            if at_terminal:
                print("> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line:
                break
            if not line.strip():
                continue
            chat.say("user", line.rstrip("\n"))
            chat.reply(choose, lambda piece: print(piece, end="", flush=True), args.max_new_tokens)
            print(flush=True)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    if at_terminal:
        print()
    return 0
