"""Evaluation: the validation loss before step 1, --keep-best, and `launch eval`
against transformers' GPT2LMHeadModel on the same windows."""
import json
import os
import re

import numpy as np
import pytest

from conftest import launch, read_metrics, write_corpus

pytestmark = pytest.mark.e2e  # each test runs python -m launch

TINY_FLAGS = ["--n-layer", 2, "--n-head", 4, "--n-embd", 64, "--block-size", 64,
              "--batch-size", 4, "--seq-len", 32, "--threads-per-worker", 1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("data"), 5, 3000, 1000)


@pytest.fixture(scope="module")
def best_run(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("best") / "run"
    done = launch("train", *TINY_FLAGS, "--data", data_dir, "--out-dir", out, "--steps", 6, "--lr", 3e-3,
                  "--eval-every", 2, "--eval-steps", 3, "--keep-best", "--keep-last", 1)
    assert done.returncode == 0, done.stderr
    return out, done


def test_validation_before_step_one_and_the_best_kept(best_run):
    out, done = best_run
    evals = [(r["step"], r["val_loss"]) for r in read_metrics(out) if "val_loss" in r]
    assert [step for step, _ in evals] == [0, 2, 4, 6]
    assert "step      0/6 | val loss" in done.stderr
    best_step, best_loss = min(evals, key=lambda e: e[1])
    best = f"step_{best_step:06d}"
    checkpoints = out / "checkpoints"
    assert (checkpoints / "best").read_text().strip() == best
    assert sorted(os.listdir(checkpoints)) == sorted({"best", "latest", best, "step_000006"})  # --keep-last 1
    state = json.loads((checkpoints / best / "state.json").read_text())
    assert state["step"] == best_step and state["best"] == {"step": best_step, "val_loss": best_loss}
    assert f"best checkpoints/{best} (val loss {best_loss:.4f})" in done.stderr


def test_keep_best_needs_evaluations(tmp_path, data_dir):
    done = launch("train", *TINY_FLAGS, "--data", data_dir, "--out-dir", tmp_path / "run", "--steps", 2,
                  "--keep-best", "--eval-every", 0)
    assert done.returncode == 2 and "--keep-best needs evaluations" in done.stderr, done.stderr
    assert not (tmp_path / "run").exists()


def reference_loss(model_dir, tokens, batch_size, seq_len, windows):
    """transformers' mean cross-entropy over windows w of B·T+1 tokens from w·B·T."""
    import torch
    from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained(model_dir, torch_dtype=torch.float64).eval()
    total = 0.0
    with torch.no_grad():
        for w in range(windows):
            window = torch.from_numpy(tokens[w * batch_size * seq_len:][:batch_size * seq_len + 1].astype(np.int64))
            logits = model(window[:-1].view(batch_size, seq_len)).logits
            total += torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), window[1:],
                                                       reduction="sum").item()
    return total / (windows * batch_size * seq_len)


def test_eval_command_against_transformers(best_run, data_dir, tmp_path):
    out, _ = best_run
    done = launch("eval", "--checkpoint", out, "--data", data_dir, "--batch-size", 4, "--seq-len", 32)
    assert done.returncode == 0, done.stderr
    match = re.search(r"val loss ([\d.]+), perplexity ([\d.]+) \((\d+) windows of 4x32", done.stdout)
    assert match, done.stdout
    loss, ppl, windows = float(match[1]), float(match[2]), int(match[3])
    from trainer.data import open_tokens
    tokens = np.asarray(open_tokens(os.path.join(data_dir, "val.bin")))
    assert windows == (tokens.size - 1) // 128  # every whole window of the file
    assert launch("export", "--checkpoint", out, "--format", "hf", "--out", tmp_path / "hf").returncode == 0
    expected = reference_loss(tmp_path / "hf", tokens, 4, 32, windows)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert ppl == pytest.approx(np.exp(expected), rel=1e-4)
    # the run's own evaluations read the first 3 of these windows: of its last step, and of its best
    evals = {r["step"]: r["val_loss"] for r in read_metrics(out) if "val_loss" in r}
    for checkpoint, step in ((out, 6), (out / "checkpoints" / "best", min(evals, key=evals.get))):
        three = launch("eval", "--checkpoint", checkpoint, "--data", data_dir, "--batch-size", 4, "--seq-len", 32,
                       "--windows", 3)
        assert three.returncode == 0, three.stderr
        assert float(re.search(r"val loss ([\d.]+)", three.stdout)[1]) == pytest.approx(evals[step], abs=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--data", "nowhere"], "data nowhere does not exist"),
    (["--seq-len", 65], "--seq-len 65 is above the model's context of 64"),
    (["--batch-size", 0], "--batch-size and --seq-len must be at least 1"),
])
def test_eval_bad_input_is_one_line(best_run, data_dir, args, message):
    out, _ = best_run
    flags = {"--data": data_dir, "--batch-size": 4, "--seq-len": 32}
    flags.update(zip(args[::2], args[1::2]))
    done = launch("eval", "--checkpoint", out, *[x for pair in flags.items() for x in pair])
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
