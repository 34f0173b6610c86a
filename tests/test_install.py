"""`pip install .` (not editable) into a fresh venv with an empty cache, then the
default job from an empty directory trains 3 steps; --precision bf16 is refused in
one line until `pip install '.[bf16]'`, after which it trains too."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, fit_cores, read_metrics


@pytest.mark.slow
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
