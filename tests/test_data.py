"""The data side: reading and checking Kaggle's CSVs, finding the data, checking the training set.

Every bad input is one DataError line naming the file, the line and column where there is
one, and the fix; the command-line wiring (exit 2, nothing written) is in test_robustness.py.
"""

import gzip
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import warnings
import zipfile

import numpy as np
import pytest
import torch

import dataloader
from conftest import ROOT, edit_cell, edit_line, good_lines, make_digits, needs_real_data, real_csv_head, write_csv
from dataloader import (MAX_LINE_BYTES, DataError, check_training_set, find_data, iter_digit_csv,
                        load_test, load_train, stratified_split)

PAST_INT64 = "18446744073709551616"  # 2**64: overflows every integer type pandas parses into


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
    shutil.copy(gz_dir / "test.csv.gz", tmp_path / "TEST.CSV.GZ")  # as some tools name it
    upper_gz_dir = tmp_path / "upper"
    upper_gz_dir.mkdir()
    shutil.copy(gz_dir / "test.csv.gz", upper_gz_dir / "test.csv.GZ")
    kaggle_cli_dir = tmp_path / "kaggle-cli"  # as `kaggle competitions download -p kaggle-cli` leaves it
    kaggle_cli_dir.mkdir()
    shutil.copy(zip_path, kaggle_cli_dir)
    for source in (zip_path, gz_dir, gz_dir / "test.csv.gz", tmp_path / "TEST.CSV.GZ", upper_gz_dir,
                   kaggle_cli_dir, kaggle_dir / "test.csv"):
        assert torch.equal(load_test(str(source)), reference)
    assert torch.equal(load_train(str(zip_path))[1], load_train(str(kaggle_dir))[1])
    assert torch.equal(load_train(str(kaggle_cli_dir))[1], load_train(str(kaggle_dir))[1])


def test_lines_up_to_the_length_limit_read_across_blocks(tmp_path):
    """Cells zero-padded to 1-15 characters: lines of 1.5-12.5 KB, many per 256 KB block that
    pandas reads; none is too long, and the values come through."""
    images, labels = make_digits(60, seed=4)
    header = ",".join(["label"] + [f"pixel{i}" for i in range(784)])
    rows = [",".join(f"{v:0{1 + i % 15}d}" for v in [int(label), *image.flatten().tolist()])
            for i, (image, label) in enumerate(zip(images, labels))]
    assert max(map(len, rows)) <= MAX_LINE_BYTES
    path = write(tmp_path / "padded.csv", "\n".join([header, *rows]) + "\n")
    loaded_images, loaded_labels = load_train(str(path))
    assert torch.equal(loaded_images, images) and torch.equal(loaded_labels, labels)
    rows[50] += "0" * MAX_LINE_BYTES  # past the limit, in a later block
    write(path, "\n".join([header, *rows]) + "\n")
    with pytest.raises(DataError, match=rf"padded.csv: line 52 is {MAX_LINE_BYTES + 1:,}\+ bytes long"):
        load_train(str(path))


@pytest.mark.parametrize("line_end", ["\r", "\r\n"], ids=["old Mac CR", "Windows CRLF"])
def test_other_line_endings_read_the_same_images(tmp_path, line_end):
    """Files far longer than one line's byte limit: the reader must see CR as a line end
    too (as pandas does), not as one endless line."""
    images, labels = make_digits(60, seed=5)
    header = ",".join(["label"] + [f"pixel{i}" for i in range(784)])
    rows = [",".join(map(str, [int(label), *image.flatten().tolist()])) for image, label in zip(images, labels)]
    path = tmp_path / "train.csv"
    path.write_bytes(line_end.join([header, *rows, ""]).encode())
    assert path.stat().st_size > 3 * MAX_LINE_BYTES
    loaded_images, loaded_labels = load_train(str(path))
    assert torch.equal(loaded_images, images) and torch.equal(loaded_labels, labels)


@needs_real_data
def test_rows_of_the_real_kaggle_files_pass_the_checks(tmp_path):
    for name, labelled in (("train.csv", True), ("test.csv", False)):
        images = load(write(tmp_path / name, real_csv_head(name, 300)), labelled)
        assert len(images[0] if labelled else images) == 300


# ----------------------------------------------------------------------------- bad CSV files

def true_false_column(lines):
    """Every row's pixel5 True or false: pandas reads such a column as 1/0, even into uint8."""
    column = lines[0].split(",").index("pixel5")
    rows = [line.split(",") for line in lines[1:]]
    for n, cells in enumerate(rows):
        cells[column] = ("True", "false")[n % 2]
    return "\n".join([lines[0], *map(",".join, rows)]) + "\n"


BAD_CONTENT = {  # case: (good lines -> bad content, what the error line must say)
    "empty file": (lambda lines: "", "file is empty"),
    "header only": (lambda lines: lines[0] + "\n", "has a header but no rows"),
    "783 pixel columns": (lambda lines: "\n".join(t.rsplit(",", 1)[0] for t in lines) + "\n",
                          "783 pixel columns, expected 784"),
    "extra cell": (edit_line(lambda t: t + ",0"), "fields in line 4, saw"),
    "extra cell on line 2": (edit_line(lambda t: t + ",0", line=2), "line 2 has"),  # pandas: an index column
    "blank line": (edit_line(lambda t: "", line=3), "line 3 is blank; delete it"),  # pandas would skip it and
    "blank last line": (lambda lines: "\n".join(lines) + "\n\n", "line 14 is blank"),  # miscount the lines after
    "blank first line": (lambda lines: "\n" + "\n".join(lines) + "\n", "line 1 is blank; the header line"),
    "blank first lines, CRLF": (lambda lines: "\r\n\r\n" + "\r\n".join(lines) + "\r\n", "line 1 is blank"),
    "blank first line after a BOM": (lambda lines: "\ufeff\n" + "\n".join(lines) + "\n", "line 1 is blank"),
    "only blank lines": (lambda lines: "\n\n\n", "line 1 is blank"),
    "spaces on the first line": (lambda lines: " \t\n" + "\n".join(lines) + "\n", "line 1 is blank"),
    "gzip data named .csv": (lambda lines: gzip.compress(("\n".join(lines) + "\n").encode()),
                             "is gzip-compressed data, not CSV text; pass it as a file named .gz"),
    "missing cell": (edit_line(lambda t: t.rsplit(",", 1)[0]), "line 4, column 'pixel783': blank or NaN"),
    "text cell": (edit_cell("x"), "line 4, column 'pixel5': 'x' is not a whole number"),
    "blank cell": (edit_cell(""), "line 4, column 'pixel5': blank or NaN"),
    "NaN cell": (edit_cell("NaN"), "line 4, column 'pixel5': blank or NaN"),
    "Inf cell": (edit_cell("inf"), "line 4, column 'pixel5': 'inf' is not a whole number"),
    "True/False column": (true_false_column, "line 2, column 'pixel5': a True/False cell"),
    "fraction": (edit_cell("0.5"), "line 4, column 'pixel5': '0.5' is not a whole number"),
    "below 0": (edit_cell("-1"), "line 4, column 'pixel5': value -1 is outside 0-255"),
    "above 255": (edit_cell("256"), "line 4, column 'pixel5': value 256 is outside 0-255"),
    "past int64": (edit_cell(PAST_INT64), f"line 4, column 'pixel5': value {PAST_INT64} is outside 0-255"),
    "below int64": (edit_cell("-" + PAST_INT64), f"line 4, column 'pixel5': value -{PAST_INT64} is outside"),
    "semicolons": (lambda lines: "\n".join(t.replace(",", ";") for t in lines) + "\n",
                   "uses ';' between cells; Kaggle's CSVs use commas"),
    "tabs": (lambda lines: "\n".join(t.replace(",", "\t") for t in lines) + "\n", "uses tabs between cells"),
    "200 KB line": (edit_line(lambda t: "7" * 200_000, line=2), f"line 2 is {MAX_LINE_BYTES + 1:,}+ bytes long"),
    "200 KB header": (edit_line(lambda t: "pixel" * 40_000, line=1), f"line 1 is {MAX_LINE_BYTES + 1:,}+ bytes"),
    "binary, not CSV": (lambda lines: np.random.default_rng(0).bytes(4096), "not a readable CSV"),
    "UTF-16": (lambda lines: ("\n".join(lines) + "\n").encode("utf-16"), "is UTF-16 text"),
    "no header line": (lambda lines: "\n".join(lines[1:]) + "\n", "no header line (the first line is "),
    "no header line, repeated values": (lambda lines: "\n".join(["0,0,0," + lines[1].split(",", 3)[3], *lines[2:]])
                                        + "\n", "no header line (the first line is 0, 0, 0, ...)"),
    "a submission": (lambda lines: "ImageId,Label\n1,7\n", "is predictions (ImageId, Label, ...), not Kaggle's"),
    "an ImageId column": (lambda lines: "\n".join(["ImageId," + lines[0]] + [f"{n},{t}" for n, t in
                                                                         enumerate(lines[1:], 1)]) + "\n",
                          "has an 'ImageId' column before the pixels;"),
    "a column twice, once with a space": (  # pandas renames exact repeats only: both reach the checks
        lambda lines: "\n".join([lines[0] + ", pixel5"] + [t + ",0" for t in lines[1:]]) + "\n",
        "column 'pixel5' appears twice in the header; keep one of them"),
    "a column twice, exactly": (  # pandas reads the second as 'pixel5.1'
        lambda lines: "\n".join([lines[0] + ",pixel5"] + [t + ",0" for t in lines[1:]]) + "\n",
        "column 'pixel5' appears twice in the header; keep one of them"),
    "pandas' index column": (  # df.to_csv(path) without index=False
        lambda lines: "\n".join(["," + lines[0]] + [f"{n},{t}" for n, t in enumerate(lines[1:])]) + "\n",
        "column 1 has no name in the header (the index that pandas' to_csv writes unless index=False"),
    "a comma at the end of each line": (lambda lines: "\n".join(t + "," for t in lines) + "\n",
                                        "has no name in the header (a comma at the end of each line?)"),
    "numpy's header": (lambda lines: "\n".join(["# " + lines[0], *lines[1:]]) + "\n",
                       "the header line starts with '#' (numpy's savetxt adds '# ' unless comments=''); remove"),
    "header not lower-case": (lambda lines: "\n".join([lines[0].title(), *lines[1:]]) + "\n",
                              "the header's names are not lower-case"),
    "a comment first": (lambda lines: "\n".join(["# digits", *lines]) + "\n",
                        "the first line is a comment (# digits), not the header; delete it"),
    "an unclosed quote": (edit_line(lambda t: t.replace(",", ',"', 1)),
                          'line 4: a quote (") opens a cell and nothing closes it; remove it'),
    "a long text cell": (edit_cell("x" * 2000), f"'{'x' * 40}...' is not a whole number"),
    "a NUL in a column name": (edit_line(lambda t: t.replace("pixel7,", "pix\0el7,"), line=1),
                               "unexpected column 'pix\\x00el7'"),
}
BAD_TRAIN_CONTENT = {
    "no label column": (lambda lines: "\n".join(t.split(",", 1)[1] for t in lines) + "\n", "no 'label' column"),
    "label 10": (edit_cell("10", column="label"), "line 4, column 'label': 10 is not a digit 0-9"),
    "label -1": (edit_cell("-1", column="label"), "line 4, column 'label': -1 is not a digit 0-9"),
    "label past int64": (edit_cell(PAST_INT64, column="label"), f"line 4, column 'label': {PAST_INT64} is not a digit"),
}
CASES = [(labelled, case) for labelled in (True, False) for case in BAD_CONTENT]
CASES += [(True, case) for case in BAD_TRAIN_CONTENT]


@pytest.mark.parametrize("fast_dtype", ["as detected", "int64"])
@pytest.mark.parametrize("labelled, case", CASES)
def test_bad_csv_is_one_line_naming_file_line_and_column(tmp_path, monkeypatch, labelled, case, fast_dtype):
    """With pandas 2, whose uint8 parse wraps 300 to 44, the fast pass parses into int64: both refuse alike."""
    if fast_dtype == "int64":
        monkeypatch.setattr(dataloader, "FAST_DTYPE", np.int64)
    make, expected = {**BAD_CONTENT, **BAD_TRAIN_CONTENT}[case]
    path = write(tmp_path / ("train.csv" if labelled else "test.csv"), make(good_lines(labelled)))
    with pytest.raises(DataError) as error:
        load(path, labelled)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and expected in message and "\n" not in message


@pytest.mark.parametrize("value, expected", [("x", "'x' is not a whole number"),
                                             (PAST_INT64, f"value {PAST_INT64} is outside 0-255")])
def test_bad_cell_in_a_later_chunk_names_its_line(tmp_path, value, expected):
    path = write(tmp_path / "test.csv", edit_cell(value, line=11)(good_lines(False)))  # third chunk of 4 rows
    chunks = iter_digit_csv(str(path), "test.csv", labelled=False, chunk_rows=4)
    assert [len(images) for images, _ in (next(chunks), next(chunks))] == [4, 4]
    with pytest.raises(DataError, match=f"line 11, column 'pixel5': {expected}"):
        next(chunks)


def test_a_block_of_true_false_cells_among_numbers_is_refused_at_its_first_line(tmp_path):
    """pandas types a column in blocks of about 1,024 rows: a block of True/False cells came
    back as Python bools among numbers, read as 1/0."""
    path = write_csv(tmp_path / "train.csv", *make_digits(1100))
    lines = open(path).read().splitlines()
    lines = true_false_column(lines[:1025]).splitlines() + lines[1025:]  # the header and 1,024 rows, then numbers
    write(tmp_path / "train.csv", "\n".join(lines) + "\n")
    with pytest.raises(DataError, match="line 2, column 'pixel5': 'True' is not a whole number"):
        load_train(path)


def test_text_cell_after_1500_rows_gives_no_pandas_warning(tmp_path):
    """pandas guesses column types per block of rows and warns (DtypeWarning, with its own source
    line on stderr) when a column mixes numbers and text: the user gets our one line only."""
    path = write_csv(tmp_path / "train.csv", *make_digits(1600))
    lines = open(path).read().splitlines()
    write(tmp_path / "train.csv", edit_cell("abc", line=1500)(lines))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        with pytest.raises(DataError, match="line 1500, column 'pixel5': 'abc' is not a whole number"):
            load_train(path)


def test_endless_line_is_an_error_at_once_in_bounded_memory():
    """/dev/zero as input: one line that never ends. Under a 1 GiB allowance of new address
    space the reader must stop with DataError, not grow until MemoryError."""
    with open("/proc/self/statm") as f:
        address_space = int(f.read().split()[0]) * resource.getpagesize()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = address_space + 2 ** 30
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    try:
        with pytest.raises(DataError, match=rf"^/dev/zero: line 1 is {MAX_LINE_BYTES + 1:,}\+ bytes long"):
            load_test("/dev/zero")
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_a_crlf_split_between_two_reads_is_one_line_end():
    """pandas reads 256 KiB at a time: a "\r\n" cut between two reads must not count twice."""
    import io

    from dataloader import _LineBoundedReader

    class Blocks(io.RawIOBase):
        def __init__(self, *blocks):
            self.blocks = list(blocks)

        def read(self, size=-1):
            return self.blocks.pop(0) if self.blocks else b""

    reader = _LineBoundedReader(Blocks(b"header\r\nrow\r", b"\n" + b"7" * (MAX_LINE_BYTES + 2)), "train.csv")
    assert reader.read(1 << 18) == b"header\r\nrow\r"
    with pytest.raises(DataError, match=rf"^train.csv: line 3 is {MAX_LINE_BYTES + 1:,}\+ bytes long"):
        reader.read(1 << 18)


def test_the_fast_pass_dtype_never_wraps_a_cell():
    """pandas 2 parses 300 into uint8 as 44 without a word; FAST_DTYPE is then int64, whose
    values the range check sees as written."""
    import io

    import pandas as pd
    try:
        read = pd.read_csv(io.StringIO("pixel0\n300\n-1\n"), dtype=dataloader.FAST_DTYPE)["pixel0"].tolist()
    except (ValueError, OverflowError):
        read = "refused"
    assert read in ("refused", [300, -1])


def _write_and_close(fd, data):
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def test_a_pipe_is_read_once():
    """A pipe cannot be read a second time: its bad cell is named like a file's, and a good one loads."""
    def load_from_a_pipe(content):
        read_end, write_end = os.pipe()
        writer = threading.Thread(target=_write_and_close, args=(write_end, content.encode()))
        writer.start()
        try:
            return load_test(f"/dev/fd/{read_end}")  # a path, as /dev/stdin is one
        finally:
            os.close(read_end)  # a writer blocked on a full pipe then stops too, instead of hanging the test
            writer.join(timeout=60)

    good = "\n".join(good_lines(False)) + "\n"
    assert load_from_a_pipe(good).shape == (len(good_lines(False)) - 1, 1, 28, 28)
    with pytest.raises(DataError, match=r"^/dev/fd/\d+: line 4, column 'pixel5': value 300 is outside 0-255"):
        load_from_a_pipe(edit_cell("300")(good_lines(False)))


# ----------------------------------------------------------------------------- zips

def zip_patched(tmp_path, patch):
    """A Kaggle-like zip whose bytes `patch` then edits in place."""
    path = tmp_path / "digit-recognizer.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("train.csv", "\n".join(good_lines(True)) + "\n")
    data = bytearray(path.read_bytes())
    patch(data, local=data.index(b"PK\x03\x04"), central=data.index(b"PK\x01\x02"))
    path.write_bytes(bytes(data))
    return path


def garble_compressed_data(data, local, central):
    start = local + 30 + len("train.csv") + 2  # past the local header and the file name, into the deflate stream
    data[start:start + 12] = bytes(b ^ 0xFF for b in data[start:start + 12])


def set_encrypted(data, local, central):  # bit 0 of the flags: what zip tools write for a password
    data[local + 6] |= 1
    data[central + 8] |= 1


def set_deflate64(data, local, central):  # compression method 9, as Windows Explorer writes for big files
    data[local + 8] = data[central + 10] = 9


def garble_central_directory(data, local, central):
    data[central:central + 4] = b"XXXX"


def truncate(data, local, central):
    del data[central:]


BAD_ZIPS = {
    "encrypted": (set_encrypted, "digit-recognizer.zip:train.csv: is encrypted; unzip it with its password"),
    "deflate64": (set_deflate64, "digit-recognizer.zip:train.csv: is compressed with deflate64, which Python "
                                 "cannot read; unpack it with unzip or 7-Zip and pass the folder"),
    "corrupt central directory": (garble_central_directory, "digit-recognizer.zip: damaged zip (Bad magic number "
                                                            "for central directory); download"),
    "truncated": (truncate, "digit-recognizer.zip: damaged zip"),
    "corrupt deflate stream": (garble_compressed_data, "digit-recognizer.zip:train.csv: damaged compressed data "
                                                       "(Error -3 while decompressing data"),
}


@pytest.mark.parametrize("case", BAD_ZIPS)
def test_unreadable_zip_is_one_line_naming_it_and_the_fix(tmp_path, case):
    patch, expected = BAD_ZIPS[case]
    path = zip_patched(tmp_path, patch)
    with pytest.raises(DataError) as error:
        load_train(str(path))
    assert str(error.value).startswith(str(path)) and expected in str(error.value)


@pytest.mark.parametrize("damaged", [True, False])
def test_a_bad_line_in_a_zip_is_blamed_on_the_zip_only_when_its_crc_fails(tmp_path, damaged):
    """Bytes changed inside a zip read as a CSV error on some line; the CRC tells the two apart."""
    good = "\n".join(good_lines(True)) + "\n"
    bad = edit_line(lambda line: line.replace(",0,", ",,,", 1))(good_lines(True))  # line 4: one cell too many
    path = tmp_path / "digit-recognizer.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:  # stored: the bytes are the CSV's own
        archive.writestr("train.csv", good if damaged else bad)
    if damaged:  # the same edit, of the same length, made to the zip's bytes after its CRC was written
        path.write_bytes(path.read_bytes().replace(good.encode(), bad.encode()))
    with pytest.raises(DataError) as error:
        load_train(str(path))
    expected = ("damaged zip (Bad CRC-32 for file 'train.csv'); download digit-recognizer.zip again" if damaged
                else "Expected 785 fields in line 4, saw 786")
    assert str(error.value).startswith(f"{path}:train.csv: ") and expected in str(error.value)


def test_a_zip_made_on_windows_with_backslash_folders_is_read(tmp_path):
    path = tmp_path / "windows.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("digit-recognizer\\train.csv", "\n".join(good_lines(True)) + "\n")
    reference = write(tmp_path / "train.csv", "\n".join(good_lines(True)) + "\n")
    assert torch.equal(load_train(str(path))[0], load_train(str(reference))[0])


def test_a_missing_csv_beside_the_kaggle_zip_points_to_the_zip(tmp_path):
    """The README's download step leaves data/digit-recognizer.zip only: data/train.csv is not there."""
    os.mkdir(tmp_path / "data")
    with zipfile.ZipFile(tmp_path / "data" / "digit-recognizer.zip", "w") as archive:
        archive.writestr("train.csv", "\n".join(good_lines(True)) + "\n")
    with pytest.raises(DataError, match=r"^data/train.csv: no such file, but data/digit-recognizer.zip is there; "
                                        r"pass that zip or its folder, data/, which reads train.csv from it$"):
        load_train("data/train.csv")  # the tests run in tmp_path
    assert len(load_train("data/")[0]) == len(good_lines(True)) - 1


def test_numpy_savetxt_output_with_its_long_float_cells_is_read(tmp_path):
    """np.savetxt's default "%.18e" writes 25 bytes a cell: a legitimate whole-number file."""
    reference = write(tmp_path / "train.csv", "\n".join(good_lines(True)) + "\n")
    values = np.loadtxt(reference, delimiter=",", skiprows=1)
    np.savetxt(tmp_path / "saved.csv", values, delimiter=",", header=good_lines(True)[0], comments="")
    assert torch.equal(load_train(str(tmp_path / "saved.csv"))[0], load_train(str(reference))[0])


def test_a_zip_name_on_a_device_is_refused_without_reading_it(tmp_path):
    (tmp_path / "zero.zip").symlink_to("/dev/zero")  # zipfile would read it to its endless end
    with pytest.raises(DataError, match="zero.zip: is not a regular file"):
        load_test(str(tmp_path / "zero.zip"))


def test_a_folder_whose_train_csv_is_a_broken_link_says_so(tmp_path):
    (tmp_path / "train.csv").symlink_to(tmp_path / "moved.csv")
    with pytest.raises(DataError, match="train.csv: cannot be read \\(a broken link"):
        load_train(str(tmp_path))


@pytest.mark.parametrize("content, expected", [(b"not gzip at all", "damaged compressed data (Not a gzipped file"),
                                               (None, "permission denied; check its permissions")])
def test_a_damaged_gz_or_an_unreadable_zip_says_which(tmp_path, content, expected):
    if content is None:  # an unreadable zip; root reads anything, so drop its override first
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv to drop root's file-permission override")
        path = tmp_path / "digit-recognizer.zip"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("test.csv", "\n".join(good_lines(False)) + "\n")
        path.chmod(0)
        code = f"from dataloader import load_test, DataError\ntry: load_test({str(path)!r})\nexcept DataError as e: print(e)"
        result = subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search",
                                 sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
        assert result.stderr == "" and result.stdout.startswith(f"{path}: {expected}")
        return
    path = write(tmp_path / "test.csv.gz", content)
    with pytest.raises(DataError, match=re.escape(expected)):
        load_test(str(path))


def test_a_zip_with_two_train_csvs_is_refused_naming_both(tmp_path):
    path = tmp_path / "two.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for folder in ("a", "b"):
            archive.writestr(f"{folder}/train.csv", "\n".join(good_lines(True)) + "\n")
    with pytest.raises(DataError, match=r"two.zip: zip holds 2 files named train.csv \(a/train.csv, b/train.csv\); "
                                        r"pass a zip or folder with one"):
        load_train(str(path))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_pipe_as_the_data_of_a_run_is_refused_without_reading_it(tmp_path):
    os.mkfifo(tmp_path / "pipe")  # nobody writes to it: opening it to read would block forever
    with pytest.raises(DataError, match="pipe: one CSV file cannot be both train.csv and test.csv"):
        find_data(str(tmp_path / "pipe"))


# ----------------------------------------------------------------------------- finding the data

def test_finds_data_folder_first(kaggle_dir, kaggle_input):
    shutil.copytree(kaggle_dir, kaggle_input / "digit-recognizer")
    assert find_data() == os.path.join("data", "")  # kaggle_dir is data/ in the current folder
    assert find_data(names=("test.csv",)) == os.path.join("data", "")


def test_kaggle_root_argument_overrides_the_environment(kaggle_dir, tmp_path, kaggle_input):
    shutil.move(kaggle_dir, tmp_path / "notebook" / "digit-recognizer")
    assert find_data(kaggle_root=str(tmp_path / "notebook")) == os.path.join(tmp_path, "notebook", "digit-recognizer", "")
    with pytest.raises(DataError, match="found no train.csv or test.csv in"):
        find_data()


def test_an_empty_kaggle_input_variable_means_the_default_not_the_current_folder(tmp_path, monkeypatch):
    from dataloader import KAGGLE_INPUT_ENV
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(KAGGLE_INPUT_ENV, "")
    (tmp_path / "digit-recognizer").mkdir()  # would be found if '' meant the current folder
    write_csv(tmp_path / "digit-recognizer" / "train.csv", *make_digits(20))
    with pytest.raises(DataError) as error:
        find_data()
    assert os.path.join("/kaggle/input", "digit-recognizer") in str(error.value)


def test_a_folder_with_both_test_csv_and_test_csv_gz_is_ambiguous(kaggle_dir):
    with open(kaggle_dir / "test.csv", "rb") as src, gzip.open(kaggle_dir / "test.csv.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    with pytest.raises(DataError, match=f"^{kaggle_dir}: holds test.csv, test.csv.gz; keep only one"):
        load_test(str(kaggle_dir))
    shutil.copy(kaggle_dir / "test.csv.gz", kaggle_dir / "test.csv.GZ")
    with pytest.raises(DataError, match="holds test.csv, test.csv.GZ, test.csv.gz; keep only one"):
        load_test(str(kaggle_dir))


def test_one_csv_cannot_be_both_training_and_test_set(kaggle_dir):
    train_csv = str(kaggle_dir / "train.csv")
    with pytest.raises(DataError, match=f"^{train_csv}: one CSV file cannot be both train.csv and test.csv .*"
                                        f"pass the folder or the Kaggle zip"):
        find_data(train_csv)
    assert find_data(train_csv, names=("train.csv",)) == train_csv  # inference --report takes one labelled file
    assert find_data(str(kaggle_dir)) == str(kaggle_dir)
    gzipped_zip = kaggle_dir / "digit-recognizer.zip.gz"
    with zipfile.ZipFile(kaggle_dir / "digit-recognizer.zip", "w") as archive:
        archive.write(train_csv, "train.csv")
    gzipped_zip.write_bytes(gzip.compress((kaggle_dir / "digit-recognizer.zip").read_bytes()))
    with pytest.raises(DataError, match="digit-recognizer.zip.gz: is a zip compressed again with gzip; gunzip it"):
        find_data(str(gzipped_zip))
    (kaggle_dir / "test.csv").unlink()
    (kaggle_dir / "test.csv").symlink_to(kaggle_dir / "train.csv")  # the same file under the other name
    with pytest.raises(DataError, match=f"test.csv: is the same file as {train_csv} .*put Kaggle's test.csv there"):
        find_data(str(kaggle_dir))


# ----------------------------------------------------------------------------- the training set

def test_too_few_rows_for_a_validation_split_is_an_error(kaggle_dir):
    labels = make_digits(5)[1]
    with pytest.raises(DataError, match=rf"^{kaggle_dir / 'train.csv'}: 5 training rows leave no validation images "
                                        r"\(10% of each digit\); a digit needs 2\+ rows to be in both sets"):
        check_training_set(str(kaggle_dir), labels, 0.1, log=pytest.fail)  # the error alone, no warning first
    assert len(stratified_split(labels, 0.1, seed=0)[1]) == 0  # what the check prevents
    check_training_set(str(kaggle_dir), labels, 0, log=lambda line: None)  # no split, no problem
    check_training_set(str(kaggle_dir), make_digits(20)[1], 0.1, log=lambda line: None)
    assert len(stratified_split(make_digits(20)[1], 0.1, seed=0)[1]) == 10  # one of each digit's 2 rows


def test_missing_digits_are_one_warning_line(kaggle_dir):
    labels = make_digits(200)[1]
    lines = []
    check_training_set(str(kaggle_dir), labels[labels != 3], 0.1, log=lines.append)
    check_training_set(str(kaggle_dir), labels[(labels != 3) & (labels != 7)], 0.1, log=lines.append)
    train_csv = kaggle_dir / "train.csv"
    assert lines == [f"warning: {train_csv}: no training images of digit 3; the model will never predict it",
                     f"warning: {train_csv}: no training images of digits 3, 7; the model will never predict them"]
    check_training_set(str(kaggle_dir), labels, 0.1, log=lines.append)
    assert len(lines) == 2


def test_line_bounded_stream_reads_through_a_text_wrapper(kaggle_dir):
    """pandas 2.x (Kaggle Notebooks) wraps the stream in io.TextIOWrapper, which calls read1."""
    import io

    from dataloader import _LineBoundedReader
    raw = (kaggle_dir / "test.csv").read_bytes()
    with io.TextIOWrapper(_LineBoundedReader(io.BytesIO(raw), "test.csv"), encoding="utf-8") as text:
        assert text.read() == raw.decode()
