"""docs/cli.md, generated from the commands' parsers and the settings table
(`python -m launch.reference > docs/cli.md`; tests/test_docs.py checks it is current)."""
import argparse

from launch.chat import chat_parser
from launch.cli import COMMANDS, eval_parser, export_parser, plot_parser, prepare_parser, sample_parser
from launch.config import SETTINGS
from launch.sweep import sweep_parser

PARSERS = {"prepare": prepare_parser, "sample": sample_parser, "chat": chat_parser, "export": export_parser,
           "eval": eval_parser, "plot": plot_parser, "sweep": sweep_parser}

HEADER = """# Command line reference

Generated from the code by `python -m launch.reference > docs/cli.md`; do not edit by hand.

```
python -m launch [COMMAND] [flags]        # or: coregpt [COMMAND] [flags]
python -m launch [flags]                  # train configs/default.toml (a small GPT on Shakespeare)
python -m launch COMMAND --help           # a command's flags
python -m launch --version
```

Exit status: 0 done; 2 bad input or a limit known up front (one line on stderr naming it,
nothing written); 1 a failed run (a worker died, a non-finite loss, a failed write);
130 / 143 after Ctrl-C / SIGTERM (the step in flight finishes and is checkpointed).
"""


def cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def train_table():
    rows = ["| flag | TOML key | default | meaning |", "| --- | --- | --- | --- |",
            "| `--config FILE` | – | – | TOML settings (keys as below); flags win over it, an unknown key is an error |"]
    for name, (kind, default, help_text) in SETTINGS.items():
        flag = "--" + name.replace("_", "-")
        shown = "off" if kind is bool and not default else "–" if default is None else f"`{default}`"
        argument = "" if kind is bool else " " + kind.__name__.upper()
        rows.append(f"| `{flag}{argument}` | `{name}` | {shown} | {cell(help_text)} |")
    return "\n".join(rows)


def flags_table(parser):
    rows = ["| flag | default | meaning |", "| --- | --- | --- |"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        name = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest.upper()}`"
        default = "required" if action.required else "–" if action.default is None or action.default is False else \
            f"`{action.default}`"
        rows.append(f"| {name} | {default} | {cell(action.help or '')} |")
    return "\n".join(rows)


def markdown():
    parts = [HEADER, "## Commands\n", "| command | what it does |", "| --- | --- |"]
    parts += [f"| `{name}` | {cell(text)} |" for name, text in COMMANDS.items()]
    parts += ["\n## train\n", "Every flag is also a key of a TOML config (`--batch-size 8` is `batch_size = 8`); "
              "a default of – is none, or worked out from the other settings where the meaning says so.\n", train_table()]
    for name, parser in PARSERS.items():
        p = parser()
        description = (p.description or "").split("\n\n")[0].replace("\n", " ")
        parts += [f"\n## {name}\n", description + "\n", flags_table(p)]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
