"""The report (plots, confusion matrix, per-class table), history.csv, progress control, --probs."""

import os
import re
import stat
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import inference
import main as main_module
import report
from DigitRecognizerModel import DigitRecognizerModel, ModelConfig, save_checkpoint
from conftest import make_digits, small_recipe, write_csv
from dataloader import AugmentConfig, DigitDataset
from trainer import HISTORY_COLUMNS, evaluate, train

CPU = torch.device("cpu")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL_PNGS = {"learning_curves", "confusion_matrix", "worst_errors", "augmentation"}


def _tiny_model():
    torch.manual_seed(0)
    return DigitRecognizerModel(ModelConfig(widths=(4, 8, 8)))


def _history(epochs=3):
    return [{"epoch": e, "train_loss": 1.0 / e, "train_accuracy": 1 - 0.3 / e, "val_loss": 0.8 / e,
             "val_accuracy": 1 - 0.2 / e, "lr": 0.1, "seconds": 1.0} for e in range(1, epochs + 1)]


@pytest.fixture
def split():
    images, labels = make_digits(140)
    return DigitDataset(images[:100], labels[:100]), DigitDataset(images[100:], labels[100:])


@pytest.fixture
def checkpoint(tmp_path):
    path = str(tmp_path / "model.pt")
    save_checkpoint(path, _tiny_model())
    return path


def _assert_png(path):
    from matplotlib.image import imread
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    image = imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) >= 200  # big enough to read


# ----------------------------------------------------------------------------- numbers

def test_confusion_matrix_counts(split):
    matrix = report.confusion_matrix(torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 2, 0, 2]), classes=3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]

    _, val_set = split
    val = evaluate(_tiny_model(), val_set, CPU)
    matrix = report.confusion_matrix(val_set.labels, val["predictions"])
    assert matrix.shape == (10, 10) and int(matrix.sum()) == len(val_set)
    assert int(matrix.diagonal().sum()) / len(val_set) == pytest.approx(val["accuracy"])
    assert val["probabilities"].shape == (len(val_set), 10)
    assert torch.equal(val["probabilities"].argmax(1), val["predictions"])


def test_per_class_accuracy_rows():
    rows = report.per_class_accuracy(torch.tensor([[3, 1, 0], [0, 2, 0], [2, 0, 0]]))
    assert [r["accuracy"] for r in rows[:2]] == [0.75, 1.0]
    assert (rows[0]["most_confused_with"], rows[0]["confused_count"]) == (1, 1)
    assert (rows[1]["most_confused_with"], rows[1]["confused_count"]) == ("", 0)
    assert rows[2]["accuracy"] == 0.0 and rows[2]["most_confused_with"] == 0


# ----------------------------------------------------------------------------- trainer

def test_history_csv_one_row_per_epoch_across_resume(tmp_path, split, capsys):
    train_set, val_set = split
    config = small_recipe(epochs=2, batch_size=32)

    def interrupt_after_first_epoch(message):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_tiny_model(), train_set, val_set, config, CPU, tmp_path, log=interrupt_after_first_epoch)
    history_path = tmp_path / "history.csv"
    first = pd.read_csv(history_path)
    assert list(first.columns) == HISTORY_COLUMNS and first["epoch"].tolist() == [1]

    lines = []
    history = train(_tiny_model(), train_set, val_set, config, CPU, tmp_path, resume=True, log=lines.append)
    resumed = pd.read_csv(history_path)
    assert list(resumed.columns) == HISTORY_COLUMNS and resumed["epoch"].tolist() == [1, 2]
    pd.testing.assert_frame_equal(resumed.iloc[:1], first)  # epoch 1 kept as it was, not re-run
    assert [row["epoch"] for row in history] == [1, 2]
    assert lines[0].startswith("resumed from") and re.match(r"epoch +2/2 .* img/s$", lines[1])
    assert capsys.readouterr().err == ""  # stderr is no terminal here: no progress bars


# ----------------------------------------------------------------------------- report

def test_write_report_writes_readable_pngs_and_csv(tmp_path, split):
    train_set, val_set = split
    probabilities = evaluate(_tiny_model(), val_set, CPU)["probabilities"]
    lines = []
    paths = report.write_report(tmp_path / "report", val_set, probabilities, history=_history(),
                                augment_config=AugmentConfig(), train_set=train_set, log=lines.append)
    assert set(paths) == ALL_PNGS | {"per_class_accuracy"}
    for name in ALL_PNGS:
        assert paths[name] == os.path.join(tmp_path / "report", f"{name}.png")
        _assert_png(paths[name])
    assert not [f for f in os.listdir(tmp_path / "report") if f.startswith(".tmp-")]  # atomic writes left nothing
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(paths["confusion_matrix"]).st_mode) == 0o666 & ~umask  # not mkstemp's 0600

    table = pd.read_csv(paths["per_class_accuracy"])
    assert list(table.columns) == report.PER_CLASS_COLUMNS
    assert table["digit"].tolist() == list(range(10)) and table["images"].sum() == len(val_set)
    assert lines[0].startswith(f"per-class accuracy on {len(val_set)} validation images")


def test_write_report_without_history_or_augmentation(tmp_path, split):
    _, val_set = split
    perfect = torch.nn.functional.one_hot(val_set.labels, 10).float()  # no errors to show: still a valid PNG
    paths = report.write_report(tmp_path, val_set, perfect, log=lambda message: None)
    assert set(paths) == {"confusion_matrix", "worst_errors", "per_class_accuracy"}
    _assert_png(paths["worst_errors"])
    assert pd.read_csv(paths["per_class_accuracy"])["accuracy"].eq(1.0).all()


def test_report_skipped_cleanly_without_matplotlib(tmp_path, split, monkeypatch):
    _, val_set = split
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    lines = []
    paths = report.write_report(tmp_path, val_set, torch.full((len(val_set), 10), 0.1), history=_history(),
                                augment_config=AugmentConfig(), log=lines.append)
    assert lines[-1] == "report skipped: matplotlib is not installed (pip install -r requirements.txt)"
    assert set(paths) == {"per_class_accuracy"}
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".png")]


# ----------------------------------------------------------------------------- main.py

@pytest.mark.parametrize("quiet", [True, False])
def test_main_report_and_quiet(tmp_path, kaggle_dir, capsys, quiet):
    report_dir = tmp_path / "reports"
    argv = ["--data", str(kaggle_dir), "--epochs", "1", "--widths", "4", "8", "8", "--batch-size", "32",
            "--checkpoint-dir", str(tmp_path / "ck"),
            "--submission", str(tmp_path / "submission.csv"), "--report", str(report_dir) if quiet else ""]
    assert main_module.main(argv + (["--quiet"] if quiet else [])) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert bool(re.search(r"^epoch +1/1 ", out, re.M)) != quiet
    assert len(pd.read_csv(tmp_path / "ck" / "history.csv")) == 1
    if quiet:
        assert set(os.listdir(report_dir)) == {f"{name}.png" for name in ALL_PNGS} | {"per_class_accuracy.csv"}
        assert "per-class accuracy on 60 validation images" in out
    else:
        assert not report_dir.exists() and "per-class" not in out


def test_main_bad_report_dir_is_one_line_exit_2(tmp_path, kaggle_dir, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main_module.main(["--data", str(kaggle_dir), "--report", str(blocker / "reports")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --report") and err.count("\n") == 1


# ----------------------------------------------------------------------------- inference.py

def test_inference_probs_output(tmp_path, checkpoint):
    test_csv = write_csv(tmp_path / "test.csv", make_digits(30, seed=3)[0])
    submission, probs_path = tmp_path / "submission.csv", tmp_path / "probs.csv"
    argv = ["--checkpoint", checkpoint, "--input", test_csv, "--output", str(submission), "--probs", str(probs_path)]
    assert inference.main(argv) == 0
    probs = pd.read_csv(probs_path)
    assert list(probs.columns) == ["ImageId"] + [f"p{k}" for k in range(10)]
    assert probs["ImageId"].tolist() == list(range(1, 31))
    values = probs[[f"p{k}" for k in range(10)]].to_numpy()
    np.testing.assert_allclose(values.sum(1), 1.0, atol=1e-5)
    assert (values.argmax(1) == pd.read_csv(submission)["Label"].to_numpy()).all()


def test_inference_report_on_labelled_csv(tmp_path, checkpoint, monkeypatch):
    monkeypatch.chdir(tmp_path)
    labelled = write_csv(tmp_path / "train.csv", *make_digits(50, seed=4))
    assert inference.main(["--checkpoint", checkpoint, "--input", labelled, "--report", "rep"]) == 0
    assert sorted(os.listdir("rep")) == ["confusion_matrix.png", "per_class_accuracy.csv", "worst_errors.png"]
    assert pd.read_csv("rep/per_class_accuracy.csv")["images"].sum() == 50
    assert not os.path.exists("final_submission.csv")  # --report scores, it does not predict for Kaggle


def test_inference_report_needs_labelled_input(tmp_path, checkpoint, capsys):
    unlabelled = write_csv(tmp_path / "test.csv", make_digits(20)[0])
    assert inference.main(["--checkpoint", checkpoint, "--input", unlabelled, "--report", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --report needs labelled input:") and "'label'" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--checkpoint", checkpoint, "--report", "r", "--output", "x.csv"])
    assert exit_info.value.code == 2
