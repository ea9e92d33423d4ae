"""The data side: reading and checking Kaggle's CSVs.

Every bad input is one DataError line naming the file, the line and column where there is
one, and the fix; the command-line wiring (exit 2, nothing written) is in test_robustness.py.
"""

import gzip
import os
import shutil
import zipfile

import numpy as np
import pytest
import torch

from conftest import edit_cell, edit_line, good_lines, make_digits
from dataloader import DataError, load_test, load_train


def load(path, labelled):
    return load_train(str(path)) if labelled else load_test(str(path))


def write(path, content):
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


# ----------------------------------------------------------------------------- good files

def test_csv_to_tensors(kaggle_dir):
    images, labels = load_train(str(kaggle_dir))
    assert images.shape == (600, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (600,) and labels.dtype == torch.int64
    assert 0 <= labels.min() and labels.max() <= 9 and set(labels.tolist()) == set(range(10))
    expected_images, expected_labels = make_digits(600, seed=1)
    assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)
    test_images = load_test(str(kaggle_dir))
    assert test_images.shape == (120, 1, 28, 28) and test_images.dtype == torch.uint8


def test_reads_zip_gz_and_plain_csv_alike(kaggle_dir, tmp_path):
    zip_path = tmp_path / "digit-recognizer.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.write(kaggle_dir / "train.csv", "train.csv")
        archive.write(kaggle_dir / "test.csv", "test.csv")
    gz_dir = tmp_path / "gz"
    gz_dir.mkdir()
    with open(kaggle_dir / "test.csv", "rb") as src, gzip.open(gz_dir / "test.csv.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    reference = load_test(str(kaggle_dir))
    for source in (zip_path, gz_dir, gz_dir / "test.csv.gz", kaggle_dir / "test.csv"):
        assert torch.equal(load_test(str(source)), reference)
    assert torch.equal(load_train(str(zip_path))[1], load_train(str(kaggle_dir))[1])


# ----------------------------------------------------------------------------- bad CSV files

BAD_CONTENT = {  # case: (good lines -> bad content, what the error line must say)
    "empty file": (lambda lines: "", "file is empty"),
    "header only": (lambda lines: lines[0] + "\n", "has a header but no rows"),
    "783 pixel columns": (lambda lines: "\n".join(t.rsplit(",", 1)[0] for t in lines) + "\n",
                          "783 pixel columns, expected 784"),
    "extra cell": (edit_line(lambda t: t + ",0"), "fields in line 4, saw"),
    "missing cell": (edit_line(lambda t: t.rsplit(",", 1)[0]), "line 4, column 'pixel783': blank or NaN"),
    "text cell": (edit_cell("x"), "line 4, column 'pixel5': 'x' is not a whole number"),
    "blank cell": (edit_cell(""), "line 4, column 'pixel5': blank or NaN"),
    "NaN cell": (edit_cell("NaN"), "line 4, column 'pixel5': blank or NaN"),
    "Inf cell": (edit_cell("inf"), "line 4, column 'pixel5': 'inf' is not a whole number"),
    "fraction": (edit_cell("0.5"), "line 4, column 'pixel5': '0.5' is not a whole number"),
    "below 0": (edit_cell("-1"), "line 4, column 'pixel5': value -1 is outside 0-255"),
    "above 255": (edit_cell("256"), "line 4, column 'pixel5': value 256 is outside 0-255"),
    "binary, not CSV": (lambda lines: np.random.default_rng(0).bytes(4096), "not a readable CSV"),
}
BAD_TRAIN_CONTENT = {
    "no label column": (lambda lines: "\n".join(t.split(",", 1)[1] for t in lines) + "\n", "no 'label' column"),
    "label 10": (edit_cell("10", column="label"), "line 4, column 'label': 10 is not a digit 0-9"),
    "label -1": (edit_cell("-1", column="label"), "line 4, column 'label': -1 is not a digit 0-9"),
}
CASES = [(labelled, case) for labelled in (True, False) for case in BAD_CONTENT]
CASES += [(True, case) for case in BAD_TRAIN_CONTENT]


@pytest.mark.parametrize("labelled, case", CASES)
def test_bad_csv_is_one_line_naming_file_line_and_column(tmp_path, labelled, case):
    make, expected = {**BAD_CONTENT, **BAD_TRAIN_CONTENT}[case]
    path = write(tmp_path / ("train.csv" if labelled else "test.csv"), make(good_lines(labelled)))
    with pytest.raises(DataError) as error:
        load(path, labelled)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message
