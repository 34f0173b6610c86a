"""`pip install .` (not editable) into a fresh venv with an empty cache, then the
default job from an empty directory trains 3 steps; --precision bf16 is refused in
one line until `pip install '.[bf16]'` (the README's install), after which it trains
too, and the README's recipe for fine-tuning on your own text runs as written (its
default job cut to BASE_STEPS, its fine-tune to FINE_TUNE_STEPS)."""
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, fit_cores, read_metrics

pytestmark = pytest.mark.system  # a fresh venv from PyPI, then minutes of training

RECIPE = re.compile(r"<!-- recipe: own-text -->\n```sh\n(.*?)```", re.S)
# the recipe's first command, the default job, stops here: its 500 steps would take 4 of
# CI's 20 minutes, and the fine-tune after it starts from whatever base it left; the
# fine-tune stops at FINE_TUNE_STEPS of its 200 (three evaluations, 0, 50 and 100)
BASE_STEPS = 20
FINE_TUNE_STEPS = 100


def test_fresh_venv_install_and_default_job(tmp_path):
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "*.egg-info", "build", "runs", ".pytest_cache"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    python = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), TIKTOKEN_CACHE_DIR=str(tmp_path / "tiktoken"))
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", str(source)],
                             env=env, capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    empty = tmp_path / "empty"
    empty.mkdir()
    where = subprocess.run([python, "-c", "import launch, trainer; print(launch.__file__)"],
                           cwd=empty, env=env, capture_output=True, text=True)
    assert str(venv) in where.stdout, where.stdout + where.stderr
    version = subprocess.run([str(venv / "bin" / "coregpt"), "--version"], cwd=empty, env=env,
                             capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout == "coregpt 0.1.0\n", version.stdout + version.stderr
    default_job = ["--workers", "2", "--steps", "3"]
    default_job += fit_cores(default_job)
    done = subprocess.run([python, "-m", "launch", *default_job, "--out-dir", "run"],
                          cwd=empty, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [r for r in read_metrics(empty / "run") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert (empty / "run" / "checkpoints" / "step_000003" / "model.safetensors").is_file()
    assert (tmp_path / "cache" / "coregpt" / "shakespeare" / "train.bin").is_file()

    bf16 = [python, "-m", "launch", *default_job, "--precision", "bf16"]
    refused = subprocess.run(bf16 + ["--out-dir", "run16"], cwd=empty, env=env, capture_output=True,
                             text=True, timeout=900)
    assert refused.returncode == 2 and not (empty / "run16").exists()
    assert refused.stderr.strip().splitlines() == [
        "coregpt: error: --precision bf16 needs ml_dtypes and oneDNN: pip install 'coregpt[bf16]'"]
    extra = subprocess.run([python, "-m", "pip", "install", "--quiet", f"{source}[bf16]"],
                           env=env, capture_output=True, text=True, timeout=900)
    assert extra.returncode == 0, extra.stderr[-3000:]
    done = subprocess.run(bf16 + ["--out-dir", "run16"], cwd=empty, env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "coregpt: matmuls: " in done.stderr and "bf16" in done.stderr.split("matmuls: ")[1].split("\n")[0]
    assert [r["step"] for r in read_metrics(empty / "run16") if "loss" in r] == [1, 2, 3]
    readme_recipe(venv, env, tmp_path / "recipe")


def readme_commands():
    """The README's own-text recipe: one argv a command (continuation lines joined, comments dropped)."""
    with open(os.path.join(REPO, "README.md")) as f:
        block = RECIPE.search(f.read())[1]
    return [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def own_text(path, n_sentences=4000):
    """A text of our own making: sentences drawn from a small grammar, ~200 KB."""
    rng = np.random.default_rng(0)
    who = ["The old sailor", "A young baker", "My neighbour", "The river", "Every child", "The quiet teacher"]
    did = ["walked to", "sang about", "painted", "remembered", "built a boat near", "wrote a letter from"]
    where = ["the harbour", "the green hills", "the market square", "the northern lights", "a small garden"]
    lines = [f"{who[rng.integers(len(who))]} {did[rng.integers(len(did))]} {where[rng.integers(len(where))]}."
             for _ in range(n_sentences)]
    path.write_text("\n".join(" ".join(lines[i:i + 5]) for i in range(0, len(lines), 5)) + "\n")


def readme_recipe(venv, env, work):
    """Run the README's recipe in `work` with the venv's python (fit to this machine's cores)."""
    work.mkdir()
    own_text(work / "notes.txt")
    path = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    outputs = []
    for argv in readme_commands():
        assert argv[0] == "python", argv
        argv = [str(venv / "bin" / "python"), *argv[1:]]
        argv += fit_cores(argv[3:]) if argv[3:4] == ["train"] or argv[3].startswith("-") else []
        argv += ["--steps", str(BASE_STEPS)] if argv[3].startswith("-") else []
        argv += ["--steps", str(FINE_TUNE_STEPS)] if argv[3] == "train" else []  # the last --steps wins
        done = subprocess.run(argv, cwd=work, env=dict(env, PATH=path), capture_output=True, text=True,
                              timeout=1200)
        assert done.returncode == 0, f"{shlex.join(argv)}:\n{done.stderr[-3000:]}"
        outputs.append(done.stdout)
    evals = {r["step"]: r["val_loss"] for r in read_metrics(work / "runs" / "notes") if "val_loss" in r}
    assert sorted(evals) == [0, 50, 100]
    best = (work / "runs" / "notes" / "checkpoints" / "best").read_text().strip()
    assert best == f"step_{min(evals, key=evals.get):06d}" and min(evals.values()) < evals[0] - 1.0
    assert outputs[3].startswith("The") and len(outputs[3]) > 60  # sample
    match = re.search(r"val loss ([\d.]+), perplexity", outputs[4])  # eval of the best checkpoint
    assert match and abs(float(match[1]) - min(evals.values())) < 0.5
    import transformers
    model = transformers.GPT2LMHeadModel.from_pretrained(work / "notes-hf")
    assert model.config.n_layer == 4 and model.config.n_embd == 128
