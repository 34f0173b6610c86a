"""What fits in memory: for each preset, full training with AdamW and with
`--optim adamw8bit`, and LoRA r=8 on peft's default targets (AdamW), at B=1, T=1024, bf16,
--recompute, 2 workers (hybrid): the header's planned peak, and with --measure the
measured peak (PSS of coordinator and workers, shared memory once; bench/memory.py's
way, 1 step) of every run whose plan fits the memory available here.

    python bench/what_fits.py [--measure] [--models gpt2,gpt2-xl] [--columns lora]

Prints a Markdown table (LoRA's base is the family's initialisation: the memory is the same
as a pretrained one's; the presets default to every one but `small`)."""
import argparse
import tempfile

import harness  # puts the repository on sys.path
from harness import coregpt_step_times  # noqa: E402
from launch.config import Settings, check  # noqa: E402
from launch.train import choose_engine  # noqa: E402
from launch.train import STARTS  # noqa: E402
from trainer.models import preset_config, presets  # noqa: E402
from trainer.trainable import kind_of  # noqa: E402
from workers.resources import meminfo_available, plan_for  # noqa: E402
from workers.strategies import strategy_for  # noqa: E402

COLUMNS = {"adamw": ["--optim", "adamw"], "adamw8bit": ["--optim", "adamw8bit"], "lora": ["--lora-rank", "8"]}
FLAGS = ["--precision", "bf16", "--recompute"]


def planned(model, column, B, T, workers):
    lora = dict(lora_rank=8) if column == "lora" else {}
    settings = check(Settings(model=model, batch_size=B, seq_len=T, workers=workers, precision="bf16", recompute=True,
                       optim="adamw" if column == "lora" else column, threads_per_worker=1, oversubscribe=True,
                       no_checkpoint=True, **lora))
    _, start = STARTS[kind_of(settings)](settings, None, None)  # the preset from scratch (LoRA's base too)
    engine, _ = choose_engine(settings)
    strategy, _ = strategy_for(settings, start, engine, (1, 1))  # what the run would take
    return plan_for(settings, start, engine, strategy).memory / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(name for name in presets() if name != "small"))
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--measure", action="store_true", help="run the ones that fit for one step")
    p.add_argument("--columns", default=",".join(COLUMNS), help="of " + ", ".join(COLUMNS))
    p.add_argument("--json", help="where to write the result (default bench/results/)")
    args = p.parse_args()
    columns = args.columns.split(",")
    B, T, W = args.batch_size, args.seq_len, args.workers
    available = meminfo_available() / 1e9
    print(f"B={B}, T={T}, {W} workers x 1 thread, {' '.join(FLAGS)}; {available:.1f} GB available here")
    print("\n| model | " + " | ".join(f"{column} planned | measured" for column in columns) + " |")
    print("|---|" + "---:|---:|" * len(columns))
    rows = []
    with tempfile.TemporaryDirectory(prefix="coregpt-fits-") as tmp:
        for model in args.models.split(","):
            data = harness.corpus(tmp, 2 * B * T + 1, vocab=preset_config(model, {}).vocab_size)
            row = {"model": model}
            for column in columns:
                plan = planned(model, column, B, T, W)
                measured = "does not fit" if plan > available else "-"
                if args.measure and plan <= available:
                    run = coregpt_step_times(model, B, T, 1, W, data, FLAGS + COLUMNS[column], watch_memory=True)
                    measured = f"{run.peak:.2f} GB ({run.times[0]:.0f} s/step)"
                row.update({f"{column} planned": f"{plan:.2f} GB", f"{column} measured": measured})
            rows.append(row)
            print(f"| {model} | " + " | ".join(list(row.values())[1:]) + " |", flush=True)
    harness.save("what_fits", {"batch_size": B, "seq_len": T, "workers": W, "flags": FLAGS,
                               "available_gb": round(available, 1)}, rows=rows, out=args.json)


if __name__ == "__main__":
    main()
