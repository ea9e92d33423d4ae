"""torchrun with 2 CPU processes (gloo) against a plain single-process run, on synthetic data.

Each class is a bright square at its own place on a 28x28 canvas plus noise: easy enough
that two epochs of the fast preset learn it, so both runs should reach the same accuracy.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from DigitRecognizerModel import load_checkpoint, model_from_checkpoint  # noqa: E402
import main  # noqa: E402

TRAIN_ROWS, TEST_ROWS = 2000, 50
FLAGS = ["--preset", "fast", "--epochs", "2", "--batch-size", "32"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def synthetic_digits(rows, seed):
    """(labels, pixels uint8 (rows, 784)): class k is a 7x7 square on a 3x4 grid, plus noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(rows) % 10
    images = rng.integers(0, 60, size=(rows, 28, 28))
    for i, k in enumerate(labels):
        top, left = 2 + 9 * (k // 4), 7 * (k % 4)
        images[i, top:top + 7, left:left + 7] = rng.integers(180, 256, size=(7, 7))
    return labels, images.reshape(rows, -1).astype(np.uint8)


def write_csv(path, pixels, labels=None):
    header = ",".join(([] if labels is None else ["label"]) + [f"pixel{i}" for i in range(784)])
    table = pixels if labels is None else np.column_stack([labels, pixels])
    np.savetxt(path, table, fmt="%d", delimiter=",", header=header, comments="")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    labels, pixels = synthetic_digits(TRAIN_ROWS, seed=1)
    write_csv(folder / "train.csv", pixels, labels)
    write_csv(folder / "test.csv", synthetic_digits(TEST_ROWS, seed=2)[1])
    return folder


def train(data_dir, out, launcher, *extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # One thread per process: the test compares accuracy, and two threads on a busy
    # 2-core machine spin-wait (10x slower here).
    env["OMP_NUM_THREADS"] = "1"
    command = launcher + ["main.py", "--data", str(data_dir), "--checkpoint-dir", str(out / "ck"),
                          "--submission", str(out / "sub.csv"), *FLAGS, *extra]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_two_processes_match_one(data_dir, tmp_path):
    result = train(data_dir, tmp_path / "ddp", TORCHRUN)
    train(data_dir, tmp_path / "single", [sys.executable])

    # Rank 0 alone writes: one checkpoint set, one history, one submission, one log.
    assert sorted(os.listdir(tmp_path / "ddp" / "ck")) == ["best.pt", "history.csv", "last.pt"]
    assert len((tmp_path / "ddp" / "sub.csv").read_text().splitlines()) == TEST_ROWS + 1
    assert len((tmp_path / "ddp" / "ck" / "history.csv").read_text().splitlines()) == 3
    assert result.stdout.count("best validation accuracy") == 1
    assert "in each of 2 processes" in result.stdout

    # Checkpoints hold the unwrapped model: they load in plain single-process inference.
    best = load_checkpoint(str(tmp_path / "ddp" / "ck" / "best.pt"))
    assert not any(key.startswith("module.") for key in best["model"])
    model_from_checkpoint(best)

    single = load_checkpoint(str(tmp_path / "single" / "ck" / "best.pt"))
    assert single["val_accuracy"] > 0.9
    assert abs(best["val_accuracy"] - single["val_accuracy"]) <= 0.03

    # Every rank loads last.pt; the run is complete, so it only rewrites the submission.
    (tmp_path / "ddp" / "sub.csv").unlink()
    resumed = train(data_dir, tmp_path / "ddp", TORCHRUN, "--resume")
    assert resumed.stdout.count("resumed from") == 1
    assert len((tmp_path / "ddp" / "sub.csv").read_text().splitlines()) == TEST_ROWS + 1


def test_batch_size_must_divide_over_processes(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit) as exit_info:
        main.parse_args(["--batch-size", "128"])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
