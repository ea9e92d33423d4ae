"""Bad input, failed writes, untrusted checkpoints, numerical faults.

Every user error is exit 2 with one line on stderr and no traceback, and leaves every file
already on disk (checkpoints, submission) with its bytes and mtime.
"""

import errno
import functools
import os
import pickle
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

import dataloader
import ensemble
import export
import files
import inference
import main
import report
import trainer
from DigitRecognizerModel import DigitRecognizerModel, ModelConfig, load_checkpoint, save_checkpoint
from conftest import (ROOT, ROWS, assert_user_error, cli, edit_cell, good_lines, make_digits, small_recipe, snapshot,
                      write_csv)
from files import HOLDER_FILE, OutputError
from dataloader import DigitDataset, augment


# ----------------------------------------------------------------------------- helpers

EARLIER_PROBABILITIES = "ImageId,p0,p1,p2,p3,p4,p5,p6,p7,p8,p9\n1," + ",".join(["0.1"] * 10) + "\n"  # as --probs writes

@pytest.fixture
def out(tmp_path):
    """Earlier results that a failed run must leave alone: a real best.pt (inference reads
    it), a last.pt and a submission."""
    folder = tmp_path / "out"
    save_checkpoint(folder / "ckpt" / "best.pt", DigitRecognizerModel(ModelConfig()), epoch=1)
    (folder / "ckpt" / "last.pt").write_bytes((folder / "ckpt" / "best.pt").read_bytes())
    (folder / "final_submission.csv").write_text("ImageId,Label\n1,7\n")
    return folder


def main_argv(data, out):
    return ["--data", data, "--checkpoint-dir", out / "ckpt", "--submission", out / "final_submission.csv",
            "--epochs", "1", "--batch-size", "4", "--device", "cpu"]


def inference_argv(test_input, out):
    return ["--checkpoint", out / "ckpt" / "best.pt", "--input", test_input, "--output", out / "final_submission.csv"]


def write_data(folder, train=None, test=None):
    """A data folder with train.csv and test.csv: good ones, unless content is given."""
    folder.mkdir(exist_ok=True)
    for name, content, labelled in (("train.csv", train, True), ("test.csv", test, False)):
        content = "\n".join(good_lines(labelled)) + "\n" if content is None else content
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


# ----------------------------------------------------------------------------- bad CSV files

def source_without(tmp_path, kind, missing):
    """A --data/--input path that lacks `missing` ('train.csv' or 'test.csv'): (path, message)."""
    if kind == "path that does not exist":
        return tmp_path / "nowhere", "no such file or folder; check the path, or get the data with `kaggle competitions"
    if kind == "zip without it":
        path = tmp_path / "digit-recognizer.zip"
        with zipfile.ZipFile(path, "w") as archive:
            for name in {"train.csv", "test.csv"} - {missing}:
                archive.writestr(name, "\n".join(good_lines(name == "train.csv")) + "\n")
        return path, f"zip has no {missing}"
    path = write_data(tmp_path / "data")  # a folder without it
    (path / missing).unlink()
    return path, f"folder has no {missing}"


SOURCES = ["path that does not exist", "zip without it", "folder without it"]


@pytest.mark.parametrize("cli_name, missing", [("main", "train.csv"), ("main", "test.csv"), ("inference", "test.csv")])
@pytest.mark.parametrize("kind", SOURCES)
def test_bad_data_path_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, out, kind, cli_name, missing):
    path, expected = source_without(tmp_path, kind, missing)
    before = snapshot(out)
    if cli_name == "main":
        code, _, err = cli(capsys, main, *main_argv(path, out))
    else:
        code, _, err = cli(capsys, inference, *inference_argv(path, out))
    assert_user_error(code, err, path, expected)
    assert snapshot(out) == before


@pytest.mark.parametrize("script", ["main.py"])  # inference.py: the in-process tests (same code, same message)
def test_bad_csv_through_the_real_command_line(tmp_path, out, script):
    """A fresh process, as a user runs it: exit 2, one line, no traceback, nothing written.
    main.py reads test.csv before training, so even a bad one leaves the checkpoints alone.
    (tests/test_data.py checks the reader's message for each kind of bad CSV.)"""
    data = write_data(tmp_path / "data", test=np.random.default_rng(0).bytes(4096))
    argv = main_argv(data, out) if script == "main.py" else inference_argv(data / "test.csv", out)
    before = snapshot(out)
    done = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, argv)],
                          capture_output=True, text=True, timeout=300)
    assert_user_error(done.returncode, done.stderr.strip().splitlines(), data / "test.csv", "not a readable CSV")
    assert snapshot(out) == before


def test_test_csv_with_label_column_is_accepted_and_noted_once(capsys, tmp_path, out):
    data = write_data(tmp_path / "data")
    (tmp_path / "labelled.csv").write_text(edit_cell("junk", column="label")(good_lines(True)))  # not even checked
    code, stdout, err = cli(capsys, inference, *inference_argv(tmp_path / "labelled.csv", out))
    assert (code, err) == (0, [])
    assert stdout.count("'label' column; it is ignored") == 1
    with_label = (out / "final_submission.csv").read_text()
    assert cli(capsys, inference, *inference_argv(data / "test.csv", out))[0] == 0
    assert (out / "final_submission.csv").read_text() == with_label
    assert len(with_label.splitlines()) == ROWS + 1


# ----------------------------------------------------------------------------- other user errors

@pytest.mark.parametrize("flag, expected", [("--output", "is a folder"), ("--probs", "is a folder"),
                                            ("--checkpoint", "is a directory")])
def test_inference_folder_where_a_file_is_expected(capsys, tmp_path, out, flag, expected):
    argv = inference_argv(write_data(tmp_path / "data") / "test.csv", out) + ["--probs", out / "probs.csv"]
    argv[argv.index(flag) + 1] = out
    before = snapshot(out)
    code, _, err = cli(capsys, inference, *argv)
    assert_user_error(code, err, out, expected)
    assert snapshot(out) == before


@pytest.mark.parametrize("flag, value, expected", [
    ("--submission", ".", "is a folder"),  # checked before training, not after it
    ("--checkpoint-dir", "ckpt/best.pt", "is a file, not a folder"),
])
def test_main_folder_and_file_mixed_up(capsys, tmp_path, out, flag, value, expected):
    argv = main_argv(write_data(tmp_path / "data"), out)
    argv[argv.index(flag) + 1] = out / value
    before = snapshot(out)
    code, stdout, err = cli(capsys, main, *argv)
    assert_user_error(code, err, expected)
    assert "epoch" not in stdout and snapshot(out) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("module", [main, inference])
def test_device_cuda_without_cuda(capsys, tmp_path, out, module):
    data = write_data(tmp_path / "data")
    argv = main_argv(data, out) if module is main else inference_argv(data / "test.csv", out)
    before = snapshot(out)
    code, _, err = cli(capsys, module, *argv, "--device", "cuda")
    assert_user_error(code, err, "no CUDA GPU", "--device cpu")
    assert snapshot(out) == before


def test_resume_from_a_checkpoint_that_is_not_a_last_pt(capsys, tmp_path, out):
    # out/ckpt/last.pt is a copy of a best.pt: weights but no optimizer state.
    before = snapshot(out)
    code, _, err = cli(capsys, main, *main_argv(write_data(tmp_path / "data"), out), "--resume")
    assert_user_error(code, err, out / "ckpt" / "last.pt", "not the last.pt of a run")
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- atomic writes

def save_half_then_raise(error):
    def save(obj, f):  # stands in for torch.save, dying halfway through the file
        f.write(b"PK\x03\x04 half a checkpoint")
        raise error
    return save


def sync_fails(error):
    def fsync(fd):  # stands in for os.fsync: the disk fills as the written file is flushed
        raise error
    return fsync


@pytest.mark.parametrize("where, error, says", [
    ("torch.save", KeyboardInterrupt(), None),
    ("fsync", OSError(errno.ENOSPC, "No space left on device"), "cannot write: the disk is full; free space"),
    ("fsync", OSError(errno.EFBIG, "File too large"), "cannot write: File too large"),
    ("fsync", KeyboardInterrupt(), None),
])
def test_checkpoint_write_that_fails_midway_keeps_the_old_file(tmp_path, monkeypatch, where, error, says):
    path = tmp_path / "best.pt"
    save_checkpoint(path, DigitRecognizerModel(ModelConfig()), epoch=1)
    before = snapshot(tmp_path)
    if where == "torch.save":
        monkeypatch.setattr(torch, "save", save_half_then_raise(error))
    else:
        monkeypatch.setattr(os, "fsync", sync_fails(error))
    with pytest.raises(type(error) if says is None else OutputError, match=None if says is None else
                       re.escape(f"{path}: {says}")):
        save_checkpoint(path, DigitRecognizerModel(ModelConfig()), epoch=2)
    assert snapshot(tmp_path) == before  # old bytes and mtime, no temp file left
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1


class LabelsThatFailAfterOneBlock:
    """Predictions whose second block fails, as a full disk would, mid-submission."""

    def __len__(self):
        return 10

    def __getitem__(self, block):
        if block.start:
            raise OSError(28, "No space left on device")
        return torch.zeros(block.stop - block.start, dtype=torch.uint8)


def test_submission_write_that_fails_midway_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "final_submission.csv"
    inference.write_submission(path, torch.tensor([7, 1], dtype=torch.uint8))
    before = snapshot(tmp_path)
    monkeypatch.setattr(inference, "CHUNK_ROWS", 4)
    with pytest.raises(OutputError, match="disk is full"):
        inference.write_submission(path, LabelsThatFailAfterOneBlock())
    assert snapshot(tmp_path) == before
    assert path.read_text() == "ImageId,Label\n1,7\n2,1\n"


def test_history_write_that_fails_before_the_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "history.csv"
    row = dict.fromkeys(trainer.HISTORY_COLUMNS, 0.5) | {"epoch": 1}
    trainer.write_history(path, [row])
    before = snapshot(tmp_path)

    def fsync_fails(fd):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "fsync", fsync_fails)
    with pytest.raises(OutputError, match="history.csv: cannot write"):
        trainer.write_history(path, [row, row | {"epoch": 2}])
    assert snapshot(tmp_path) == before


def test_probs_and_submission_untouched_when_input_fails_midway(capsys, tmp_path, out, monkeypatch):
    """--probs streams rows into its temp file; a bad row after some chunks discards it."""
    (out / "probs.csv").write_text(EARLIER_PROBABILITIES)  # an earlier run's, which it may replace
    test_csv = tmp_path / "test.csv"
    test_csv.write_text(edit_cell("x", line=11)(good_lines(False)))  # in the third chunk of 4 rows
    monkeypatch.setattr(inference, "iter_digit_csv", functools.partial(inference.iter_digit_csv, chunk_rows=4))
    before = snapshot(out)
    code, _, err = cli(capsys, inference, *inference_argv(test_csv, out), "--probs", out / "probs.csv")
    assert_user_error(code, err, "line 11, column 'pixel5'")
    assert snapshot(out) == before


def test_inference_streams_labels_and_probabilities(tmp_path, out, monkeypatch):
    """Memory stays bounded: one uint8 label a row is kept; probabilities go straight to the file."""
    monkeypatch.setattr(inference, "iter_digit_csv", functools.partial(inference.iter_digit_csv, chunk_rows=5))
    test_csv = write_data(tmp_path / "data") / "test.csv"
    models = inference.load_models([out / "ckpt" / "best.pt"], torch.device("cpu"))
    with open(tmp_path / "probs.csv", "w") as probs_file:
        labels = inference.predict_file(models, test_csv, torch.device("cpu"), probs_file=probs_file)
    images, _ = make_digits(ROWS, seed=5)
    expected = inference.predict_probs(models, images, torch.device("cpu"))
    assert labels.dtype == torch.uint8 and torch.equal(labels.long(), expected.argmax(1))
    probs = np.loadtxt(tmp_path / "probs.csv", delimiter=",", skiprows=1)
    assert probs[:, 0].tolist() == list(range(1, ROWS + 1))
    assert np.allclose(probs[:, 1:], expected.numpy(), atol=1e-6)


# ----------------------------------------------------------------------------- untrusted checkpoints

class CreatesFileWhenUnpickled:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def write_malicious_torch_save(path, marker, good):
    torch.save({"model_config": {}, "model": CreatesFileWhenUnpickled(marker)}, path)


def write_malicious_pickle(path, marker, good):
    with open(path, "wb") as f:
        pickle.dump({"model_config": {}, "model": CreatesFileWhenUnpickled(marker)}, f)


def write_other_widths(path, marker, good):
    state = torch.load(good, weights_only=True)
    state["model"] = DigitRecognizerModel(ModelConfig(widths=(8, 16, 32))).state_dict()
    torch.save(state, path)


def write_with_config(**config):
    def write(path, marker, good):
        torch.save({**torch.load(good, weights_only=True), "model_config": config}, path)
    return write


def write_with_state(change):
    def write(path, marker, good):
        state = torch.load(good, weights_only=True)
        change(state)
        torch.save(state, path)
    return write


def write_with_record(pickled):
    """The good checkpoint with its pickle record replaced by `pickled`."""
    def write(path, marker, good):
        with zipfile.ZipFile(good) as source, zipfile.ZipFile(path, "w") as target:
            for name in source.namelist():
                target.writestr(name, pickled if name.endswith("/data.pkl") else source.read(name))
    return write


def write_repacked(compression):
    """The good checkpoint's records copied into a zip of another compression."""
    def write(path, marker, good):
        with zipfile.ZipFile(good) as source, zipfile.ZipFile(path, "w", compression) as target:
            for name in source.namelist():
                target.writestr(name, source.read(name))
    return write


def write_with_nan_weight(path, marker, good):
    state = torch.load(good, weights_only=True)
    state["model"]["classifier.2.weight"][3, 5] = float("nan")
    torch.save(state, path)


def write_with_a_weight_changed(path, marker, good):
    """One byte of the largest weight record flipped, as a bad disk or copy would: it still loads."""
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as archive:
        record = max(archive.infolist(), key=lambda r: r.file_size)
    data[record.header_offset + 30 + len(record.filename.encode()) + len(record.extra) + 100] ^= 0x40
    path.write_bytes(bytes(data))


def write_with_a_flag_flipped(path, marker, good):
    """The "encrypted" bit of one record's directory entry set, as one flipped bit would."""
    data = bytearray(good.read_bytes())
    data[data.rindex(b"PK\x01\x02") + 8] |= 1
    path.write_bytes(bytes(data))


def write_with_a_record_marked_as_a_folder(path, marker, good):
    """The folder bit of a weight record's file attributes set: zipfile ignores it, torch.load
    reads the record as empty and the weights as whatever memory held."""
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as archive:
        record = max(archive.infolist(), key=lambda r: r.file_size)
    entry = data.index(b"PK\x01\x02")  # the first directory entry
    while data[entry + 46:entry + 46 + len(record.filename)] != record.filename.encode():
        names, extra, comment = struct.unpack("<HHH", data[entry + 28:entry + 34])
        entry += 46 + names + extra + comment
    data[entry + 38] ^= 0x10
    path.write_bytes(bytes(data))


BAD_CHECKPOINTS = {  # case: (writer(path, marker, good checkpoint), what the error line must say)
    "malicious torch.save": (write_malicious_torch_save, "refused to load"),
    "malicious pickle": (write_malicious_pickle, "refused to load"),
    "truncated": (lambda path, marker, good: path.write_bytes(good.read_bytes()[:20000]),
                  "not a readable checkpoint (truncated or corrupted?)"),
    "empty": (lambda path, marker, good: path.write_bytes(b""), "not a readable checkpoint"),
    "random bytes": (lambda path, marker, good: path.write_bytes(np.random.default_rng(1).bytes(5000)),
                     "not a checkpoint (its bytes"),
    "random bytes after a pickle's first byte": (
        lambda path, marker, good: path.write_bytes(b"\x80" + np.random.default_rng(1).bytes(5000)),
        "unsafe or corrupted"),
    "a CSV": (lambda path, marker, good: path.write_text("\n".join(good_lines(False))), "not a checkpoint (its bytes"),
    "an ONNX model": (lambda path, marker, good: path.write_bytes(b"\x08\x08\x12\x07pytorch" + bytes(100)),
                      "not a checkpoint (its bytes"),
    "a text file": (lambda path, marker, good: path.write_text("hello world"), "not a checkpoint (its bytes"),
    "a history.csv": (lambda path, marker, good: path.write_text("epoch,train_loss\n1,0.5\n"),
                      "not a checkpoint (its bytes"),
    "unknown architecture": (write_with_config(arch="resnet"), "unknown architecture 'resnet'"),
    "other widths": (write_other_widths, "cannot be used: features.0.weight is (8, 1, 3, 3), the config needs (16,"),
    "other config": (write_with_config(widths=(16, 32)), "cannot be used: the cnn architecture takes 3 widths"),
    "unknown config field": (write_with_config(depth=3), "its model config has fields this version does not know "
                                                         "['depth']: written by a newer version? update this code"),
    "a crafted pickle record": (write_with_record(b"\x80\x02K\x01Q."), "not a checkpoint (its bytes are not a saved"),
    "compressed records": (write_repacked(zipfile.ZIP_DEFLATED), "its records are compressed, which torch.save never"),
    "a weight changed": (write_with_a_weight_changed, "damaged (the CRC of its record archive/data/"),
    "a flag bit flipped": (write_with_a_flag_flipped, "damaged (File 'archive/"),
    "a record marked as a folder": (write_with_a_record_marked_as_a_folder, "damaged (a record is marked as a folder"),
    "a zip that is not a checkpoint": (lambda path, marker, good: zipfile.ZipFile(path, "w").writestr("train.csv", "x"),
                                       "is a zip but not a PyTorch checkpoint (no data.pkl in it)"),
    "an extra huge view among the weights": (
        write_with_state(lambda state: state["model"].update(zz=torch.zeros(1).as_strided((40000, 40000), (0, 0)))),
        "cannot be used: its weights hold 'zz', which the config's model does not have"),
    "whole-number weights": (write_with_state(lambda state: state["model"].update(
        {k: v.long() for k, v in state["model"].items() if v.is_floating_point()})),
        "cannot be used: features.0.weight holds int64 values, the model float32"),
    "complex weights": (write_with_state(lambda state: state["model"].update(
        {k: v.to(torch.complex64) for k, v in state["model"].items() if v.is_floating_point()})),
        "cannot be used: features.0.weight holds complex64 values, the model float32"),
    "plain state_dict": (lambda path, marker, good: torch.save(DigitRecognizerModel(ModelConfig()).state_dict(), path),
                         "not a checkpoint written by this suite"),
    "11 classes": (lambda path, marker, good: save_checkpoint(path, DigitRecognizerModel(ModelConfig(num_classes=11))),
                   "cannot be used: it predicts 11 classes, not the 10 digits"),
    "NaN weights": (write_with_nan_weight, "cannot be used: its weights hold NaN or Inf values"),
    "recipe not a dict": (lambda path, marker, good: torch.save({**torch.load(good, weights_only=True),
                                                                 "identity": "x"}, path),
                          "not a checkpoint written by this suite (its recipe is not a dict)"),
    "widths 100000 with small tensors": (write_with_config(arch="cnn", widths=(100000, 100000, 100000)),
                                         "cannot be used: widths (100000, 100000, 100000) are not whole numbers 1-1024"),
    "a pipe": (lambda path, marker, good: os.mkfifo(path), "is a device, pipe or socket, not a checkpoint file"),
    "NaN dropout": (write_with_config(dropout=float("nan")), "cannot be used: dropout nan is not a probability 0 to 1"),
    "classes as text": (write_with_config(num_classes="10"), "cannot be used: it predicts '10' classes, not the 10"),
    "a width that is True": (write_with_config(widths=(True, 32, 128)), "widths (True, 32, 128) are not whole numbers"),
    "a number among the weights": (write_with_state(lambda state: state["model"].update(extra=3)),
                                   "cannot be used: 'extra' in its weights is not a named tensor (int)"),
    "negative running variance": (write_with_state(lambda state: state["model"]["features.1.running_var"].neg_()),
                                  "cannot be used: its BatchNorm running variances hold negative values"),
    "finite weights that overflow": (write_with_state(lambda state: state["model"]["classifier.2.weight"].fill_(3e38)),
                                     "gives NaN or Inf probabilities (damaged weights?)"),
    "widths 1024 with small tensors": (write_with_config(arch="cnn", widths=(1024, 1024, 1024)),
                                       "cannot be used: features.0.weight is (16, 1, 3, 3), the config needs (1024,"),
}


def test_a_checkpoint_that_cannot_be_read_is_one_line(capsys, tmp_path, out):
    """/proc/self/mem is a regular file whose first bytes cannot be read (EIO)."""
    code, _, err = cli(capsys, inference, "--checkpoint", "/proc/self/mem", "--input",
                       write_data(tmp_path / "data") / "test.csv", "--output", out / "final_submission.csv")
    assert_user_error(code, err, "/proc/self/mem: not a readable checkpoint")


@pytest.mark.parametrize("command", [inference, export], ids=["inference", "export"])
@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoint_is_one_line_exit_2(capsys, tmp_path, out, case, command):
    write, expected = BAD_CHECKPOINTS[case]
    path, marker = tmp_path / "model.pt", tmp_path / "pwned"
    write(path, marker, out / "ckpt" / "best.pt")
    before = snapshot(out)
    argv = inference_argv(write_data(tmp_path / "data") / "test.csv", out)[2:]
    if command is export:
        argv = ["--output", out / "model.onnx"]
    code, _, err = cli(capsys, command, *argv, "--checkpoint", path)
    assert_user_error(code, err, path, expected)
    assert not marker.exists() and snapshot(out) == before


def test_a_checkpoint_saved_with_torchs_crcs_off_loads(tmp_path):
    """torch.serialization.set_crc32_options(False) writes 0 for every CRC: nothing to check, not damage."""
    torch.serialization.set_crc32_options(False)
    try:
        save_checkpoint(tmp_path / "best.pt", DigitRecognizerModel(ModelConfig()), epoch=3)
    finally:
        torch.serialization.set_crc32_options(True)
    with zipfile.ZipFile(tmp_path / "best.pt") as archive:
        assert {record.CRC for record in archive.infolist()} == {0}
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 3


def test_malicious_checkpoint_runs_no_code_through_the_real_command_line(tmp_path, out):
    path, marker = tmp_path / "model.pt", tmp_path / "pwned"
    write_malicious_torch_save(path, marker, None)
    before = snapshot(out)
    argv = ["--checkpoint", path, *inference_argv(write_data(tmp_path / "data") / "test.csv", out)[2:]]
    done = subprocess.run([sys.executable, os.path.join(ROOT, "inference.py"), *map(str, argv)],
                          capture_output=True, text=True, timeout=300)
    assert_user_error(done.returncode, done.stderr.strip().splitlines(), path, "refused to load", "GLOBAL")
    assert not marker.exists() and snapshot(out) == before
    torch.load(path, weights_only=False)  # control: the payload is live when unpickled unsafely
    assert marker.exists()


def cuda_saved_copy(src, dst):
    """`src` as if torch.save had written it from CUDA tensors: the only difference in the file is
    the device string recorded for each storage in data.pkl (pickle memoises it: one occurrence).
    torch.save uses pickle protocol 2, where that string is BINUNICODE: 'X', 4-byte length, text."""
    with zipfile.ZipFile(src) as source, zipfile.ZipFile(dst, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("/data.pkl"):
                assert data.count(b"X\x03\x00\x00\x00cpu") == 1
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            target.writestr(info, data)


def test_cuda_saved_checkpoint_loads_on_cpu(capsys, tmp_path, out):
    path = tmp_path / "cuda.pt"
    cuda_saved_copy(out / "ckpt" / "best.pt", path)
    if not torch.cuda.is_available():  # proves the file really asks for CUDA
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    state = load_checkpoint(path)
    expected = load_checkpoint(out / "ckpt" / "best.pt")["model"]
    assert all(t.device.type == "cpu" and torch.equal(t, expected[k]) for k, t in state["model"].items())
    code, _, err = cli(capsys, inference, "--checkpoint", path, "--device", "cpu",
                       *inference_argv(write_data(tmp_path / "data") / "test.csv", out)[2:])
    assert (code, err) == (0, [])


# ----------------------------------------------------------------------------- numerical faults

def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoints(tmp_path, monkeypatch):
    images, labels = make_digits(160, seed=3)
    data = DigitDataset(images, labels)
    train_set, val_set = data.subset(torch.arange(128)), data.subset(torch.arange(128, 160))
    config = small_recipe(epochs=3, batch_size=32)
    steps_per_epoch = 128 // 32
    calls = []

    def augment_then_nan_from_epoch_2(x, augment_config, generator):
        calls.append(None)
        x = augment(x, augment_config, generator)
        return x * float("nan") if len(calls) > steps_per_epoch else x
    monkeypatch.setattr(trainer, "augment", augment_then_nan_from_epoch_2)
    after_epoch = {}

    def log(line):  # called after each epoch's files are written
        after_epoch[len(after_epoch) + 1] = snapshot(tmp_path)
    expected = r"loss became nan in epoch 2; lower --lr .*best\.pt keeps the best weights up to epoch 1"
    with pytest.raises(trainer.TrainingDiverged, match=expected):
        trainer.train(DigitRecognizerModel(ModelConfig()), train_set, val_set, config, torch.device("cpu"),
                      tmp_path, log=log)
    assert list(after_epoch) == [1]
    assert snapshot(tmp_path) == after_epoch[1]  # best.pt, last.pt, history.csv: epoch 1's
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1


def test_batchnorm_statistics_that_overflow_stop_training_and_keep_the_last_good_checkpoints(tmp_path, monkeypatch):
    """The loss and weights can stay finite while a running variance overflows: the model is
    broken all the same, and that epoch must not replace best.pt."""
    images, labels = make_digits(160, seed=3)
    data = DigitDataset(images, labels)
    real_epoch = trainer.Trainer.train_epoch

    def overflow_from_epoch_2(self, epoch):
        result = real_epoch(self, epoch)
        if epoch == 1:
            self.model.features[1].running_var.fill_(float("inf"))
        return result
    monkeypatch.setattr(trainer.Trainer, "train_epoch", overflow_from_epoch_2)
    with pytest.raises(trainer.TrainingDiverged, match="BatchNorm statistics became NaN or Inf in epoch 2"):
        trainer.train(DigitRecognizerModel(ModelConfig(widths=(4, 8, 8))), data.subset(torch.arange(128)),
                      data.subset(torch.arange(128, 160)), small_recipe(epochs=3, batch_size=32), torch.device("cpu"),
                      tmp_path, log=lambda *_: None)
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1 and load_checkpoint(tmp_path / "last.pt")["epoch"] == 1


def test_diverging_run_exits_1_with_one_line_and_writes_no_submission(capsys, tmp_path, kaggle_dir):
    out = tmp_path / "out"
    code, _, err = cli(capsys, main, *main_argv(kaggle_dir, out), "--lr", "100", "--batch-size", "64")
    assert code == 1 and len(err) == 1
    assert re.match(r"error: (loss became nan|weights or BatchNorm statistics became NaN or Inf) in epoch 1; lower --lr",
                    err[0])
    assert not (out / "final_submission.csv").exists() and not (out / "ckpt" / "best.pt").exists()


# ----------------------------------------------------------------------------- outputs that would destroy something

def symlink(link, target):
    link.symlink_to(target)
    return link


def fifo(path):
    os.mkfifo(path)
    return path


def users_file(path, text="the user's own\n"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("module, argv, flag", [
    (main, ["--data", ""], "--data"), (inference, ["--checkpoint", ""], "--checkpoint"),
    (inference, ["--checkpoint", "best.pt", "--input", ""], "--input"),
    (export, ["--checkpoint", "best.pt", "--input", ""], "--input")], ids=["main", "inference", "inference", "export"])
def test_an_empty_input_path_is_one_line_naming_its_flag(capsys, module, argv, flag):
    with pytest.raises(SystemExit) as stop:
        module.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and f"error: argument {flag}: is empty; give a path" in err[0]


def kaggle_zip_only(folder):
    """`folder` as the Kaggle CLI leaves it: digit-recognizer.zip with the CSVs inside, nothing else."""
    with zipfile.ZipFile(folder / "digit-recognizer.zip", "w") as archive:
        for name in ("train.csv", "test.csv"):
            archive.write(folder / name, name)
            (folder / name).unlink()
    return folder


COLLISIONS = {  # case: (command, flag, its value for (tmp_path, out, data folder), what the line must say)
    "inference --output is the --input": (inference, "--output", lambda t, o, d: d / "test.csv",
                                          "--output {}: is an input of this run"),
    "inference --output is the checkpoint": (inference, "--output", lambda t, o, d: o / "ckpt" / "best.pt",
                                             "--output {}: is an input of this run"),
    "inference --output is a symlink to the input": (
        inference, "--output", lambda t, o, d: symlink(t / "link.csv", d / "test.csv"), "--output {}: is an input"),
    "inference --output is a hard link to the input": (
        inference, "--output", lambda t, o, d: os.link(d / "test.csv", t / "hard.csv") or t / "hard.csv",
        "--output {}: is an input"),
    "inference --probs is the --output": (inference, "--probs", lambda t, o, d: o / "final_submission.csv",
                                          "--probs {}: is also the --output output"),
    "main --submission is the data's test.csv": (main, "--submission", lambda t, o, d: d / "test.csv",
                                                 "--submission {}: is an input of this run"),
    "main --submission is the Kaggle zip that --data's folder holds": (
        main, "--submission", lambda t, o, d: kaggle_zip_only(d) / "digit-recognizer.zip", "--submission {}: is an input"),
    "main --submission would stand in for the zip's test.csv": (
        main, "--submission", lambda t, o, d: kaggle_zip_only(d) / "test.csv",
        "--submission {}: later runs would read it as the test data in"),
    "main --submission would stand in for the zip's train.csv": (
        main, "--submission", lambda t, o, d: kaggle_zip_only(d) / "train.csv.GZ",
        "--submission {}: later runs would read it as the training data in"),
    "main --submission is a symlink to train.csv": (
        main, "--submission", lambda t, o, d: symlink(t / "link.csv", d / "train.csv"), "--submission {}: is an input"),
    "inference --output is a pipe": (inference, "--output", lambda t, o, d: fifo(t / "pipe.csv"),
                                     "--output {}: is a device, pipe or socket, not a file"),
    "inference --probs links to /dev/null": (inference, "--probs", lambda t, o, d: symlink(t / "p.csv", "/dev/null"),
                                             "--probs {}: is a device, pipe or socket, not a file"),
    "main --submission is a pipe": (main, "--submission", lambda t, o, d: fifo(t / "pipe.csv"),
                                    "--submission {}: is a device, pipe or socket, not a file"),
    "main --submission is a folder above the checkpoints": (
        main, "--submission", lambda t, o, d: o, "--submission {}: is a folder of the --checkpoint-dir output"),
    "main --submission is the run lock's holder file": (
        main, "--submission", lambda t, o, d: o / "ckpt" / HOLDER_FILE, "{}: is also the --submission output"),
    "inference --output would replace a checkpoint": (
        inference, "--output", lambda t, o, d: shutil.copy(o / "ckpt" / "best.pt", t / "copy.pt"),
        "--output {}: would replace a file that is not a submission CSV this suite wrote"),
    "main --submission would replace a script": (
        main, "--submission", lambda t, o, d: shutil.copy(os.path.join(ROOT, "recipe.py"), t / "recipe.py"),
        "--submission {}: would replace a file that is not a submission CSV this suite wrote"),
    "inference --output ends in a slash": (
        inference, "--output", lambda t, o, d: f"{shutil.copy(o / 'ckpt' / 'best.pt', t / 'other.pt')}/",
        "--output {}: ends in a folder, not a file name"),
    "main --submission ends in /.": (main, "--submission", lambda t, o, d: f"{users_file(t / 'notes.txt')}/.",
                                     "--submission {}: ends in a folder, not a file name"),
    "inference --output is a .csv link to another kind of file": (
        inference, "--output", lambda t, o, d: symlink(t / "link.csv", users_file(t / "notes.txt")),
        "--output {}: would replace a file that is not a submission CSV this suite wrote"),
    "inference --output is empty": (inference, "--output", lambda t, o, d: "", "--output is empty"),
    "main --submission is longer than a file name may be": (
        main, "--submission", lambda t, o, d: t / ("a" * 300 + ".csv"), "bytes, longer than the 255 this file system"),
    "main --checkpoint-dir has a name longer than a file name may be": (
        main, "--checkpoint-dir", lambda t, o, d: t / ("c" * 256) / "ck", "bytes, longer than the 255 this file system"),
    "main --checkpoint-dir is a file": (main, "--checkpoint-dir", lambda t, o, d: users_file(t / "notes"),
                                        "--checkpoint-dir {}: is a file, not a folder; pass a folder path"),
    "main --submission is the checkpoint folder's history.csv": (
        main, "--submission", lambda t, o, d: o / "ckpt" / "history.csv", "history.csv: is also the --submission output"),
}


@pytest.mark.parametrize("case", COLLISIONS)
def test_an_output_that_is_an_input_or_another_output_is_refused_before_anything_runs(capsys, tmp_path, out, case):
    module, flag, value, expected = COLLISIONS[case]
    data = write_data(tmp_path / "data")
    argv = main_argv(data, out) if module is main else inference_argv(data / "test.csv", out) + ["--probs", "p.csv"]
    path = value(tmp_path, out, data)
    argv[argv.index(flag) + 1] = path
    before = snapshot(tmp_path)
    code, stdout, err = cli(capsys, module, *argv)
    assert_user_error(code, err, expected.format(path))
    assert "data:" not in stdout and "epoch" not in stdout
    assert snapshot(tmp_path) == before


def test_inference_output_beside_the_kaggle_zip_that_later_runs_would_read_is_refused(capsys, tmp_path, out,
                                                                                       monkeypatch):
    """The README's data/ holds only the zip: data/train.csv would be read instead of the zip's."""
    data = kaggle_zip_only(write_data(tmp_path / "data"))
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, inference, "--checkpoint", out / "ckpt" / "best.pt", "--input", data,
                       "--output", data / "train.csv")
    assert_user_error(code, err, f"--output {data / 'train.csv'}: later runs would read it as the training data in "
                                 f"{data}/; choose another path")
    assert snapshot(tmp_path) == before
    monkeypatch.chdir(tmp_path)  # data/ is where `python main.py` looks first, whatever this command reads
    elsewhere = write_data(tmp_path / "elsewhere")
    code, _, err = cli(capsys, inference, "--checkpoint", out / "ckpt" / "best.pt", "--input", elsewhere / "test.csv",
                       "--output", "data/test.csv")
    assert_user_error(code, err, "--output data/test.csv: later runs would read it as the test data in data/")
    assert not (data / "test.csv").exists()
    (data / "digit-recognizer.zip").rename(tmp_path / "kaggle.zip")  # no data/ at all: the output would make it
    data.rmdir()
    code, _, err = cli(capsys, inference, "--checkpoint", out / "ckpt" / "best.pt", "--input", elsewhere / "test.csv",
                       "--output", "data/train.csv")
    assert_user_error(code, err, "--output data/train.csv: later runs would read it as the training data in data/")
    assert not data.exists()


def test_report_folder_may_be_the_data_folder():
    """Only a report file that is an input collides; sharing the folder is fine."""
    options, recipe = main.parse_args(["--data", "data", "--report", "data"])
    inputs = dataloader.source_files("data", "train.csv") + dataloader.source_files("data", "test.csv")
    main.check_outputs(main.planned_outputs(options, recipe), inputs)


# ----------------------------------------------------------------------------- unwritable outputs

@pytest.mark.parametrize("submission, expected", [("", "--submission is empty"),
                                                  ("/sys/final_submission.csv", "cannot write in /sys")])
def test_unwritable_submission_fails_before_the_data_is_loaded(capsys, tmp_path, out, submission, expected):
    argv = main_argv(write_data(tmp_path / "data"), out)
    argv[argv.index("--submission") + 1] = submission
    before = snapshot(out)
    code, stdout, err = cli(capsys, main, *argv)
    assert_user_error(code, err, expected, f"--submission {submission}".strip())
    assert "data:" not in stdout and snapshot(out) == before


def test_full_disk_while_writing_the_submission_names_it_and_keeps_the_old_one(capsys, tmp_path, out, monkeypatch):
    def write_on_a_full_disk(path, predictions):
        with monkeypatch.context() as patch:
            patch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
            inference.write_submission(path, predictions)
    monkeypatch.setattr(main, "write_submission", write_on_a_full_disk)
    old = (out / "final_submission.csv").read_bytes()
    argv = [*main_argv(write_data(tmp_path / "data"), out), "--widths", 4, 8, 8, "--report", ""]
    code, _, err = cli(capsys, main, *argv)
    assert code == 2 and err[0] == f"error: {out / 'final_submission.csv'}: cannot write: the disk is full; free space " \
                                   f"or choose another location"
    assert (out / "final_submission.csv").read_bytes() == old
    assert not [name for name in os.listdir(out) if name.startswith(".tmp-")]
    assert err[-1].startswith("the epochs done are kept; once that is fixed, resume with: ")  # trained: not lost
    monkeypatch.undo()
    code, stdout, err = cli(capsys, main, *argv, "--resume")
    assert (code, err) == (0, []) and "resumed from" in stdout and f"wrote {out / 'final_submission.csv'} (" in stdout


# ----------------------------------------------------------------------------- runs that fail early leave nothing

FAILURES = {  # case: (flags, what the line must say)
    "bad test.csv": (["--data", "bad"], "not a readable CSV"),
    "--batch-size above the training rows": (["--data", "data", "--batch-size", 64],
                                             "--batch-size 64 is larger than the 10 training images"),
    "--resume with nothing to resume": (["--data", "data", "--resume", "--batch-size", 4], "last.pt: nothing to resume"),
}


def test_a_write_that_fails_leaves_no_folder_it_made(tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(files.tempfile, "mkstemp", no_space)
    with pytest.raises(OutputError, match="a/b/sub.csv: cannot write: the disk is full"):
        files.atomic_write_text(str(tmp_path / "a" / "b" / "sub.csv"), "ImageId,Label\n")
    assert os.listdir(tmp_path) == []


def test_a_file_mounted_on_its_own_is_one_line(tmp_path, monkeypatch):
    """docker -v host.csv:/work/sub.csv: renaming onto a mount point fails with EBUSY."""
    def busy(*args):
        raise OSError(errno.EBUSY, "Device or resource busy")
    monkeypatch.setattr(files.os, "replace", busy)
    with pytest.raises(OutputError, match="sub.csv: cannot write: it is a mount point"):
        files.atomic_write_text(str(tmp_path / "sub.csv"), "ImageId,Label\n")
    assert os.listdir(tmp_path) == []


def test_a_path_too_long_for_the_system_is_refused_before_any_work(tmp_path):
    deep = os.path.join(str(tmp_path), *["d" * 250] * 17, "sub.csv")  # every name fits, the path does not
    with pytest.raises(OutputError, match=r"the path is [\d,]+ bytes, longer than the 4,096 this system allows"):
        files.check_outputs([("--submission", deep, inference.SUBMISSION)], [])
    assert os.listdir(tmp_path) == []


def test_one_folder_reached_by_two_paths_is_one_output(tmp_path):
    """A bind mount (or any second path to a folder) makes two spellings of a file still to be written."""
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").mkdir()
    if subprocess.run(["mount", "--bind", tmp_path / "real", tmp_path / "alias"], capture_output=True).returncode:
        pytest.skip("bind mounts need root")
    try:
        with pytest.raises(OutputError, match="alias/new.csv: is also the --output output of this run"):
            files.check_outputs([("--output", str(tmp_path / "real" / "new.csv"), inference.SUBMISSION),
                                 ("--probs", str(tmp_path / "alias" / "new.csv"), inference.PROBABILITIES)], [])
    finally:
        subprocess.run(["umount", tmp_path / "alias"], check=True)


def test_batch_size_is_checked_against_the_real_folds(capsys, tmp_path):
    """Stratified folds differ by up to a row a digit: the smallest member's rows decide."""
    images, labels = make_digits(400)
    (tmp_path / "data").mkdir()
    write_csv(tmp_path / "data" / "train.csv", images, labels)
    write_csv(tmp_path / "data" / "test.csv", images[:20])
    fewest = min(len(m.train_rows) for m in ensemble.plan(main.parse_args(["--folds", "3"])[1], labels, "ck", 0))
    assert fewest < 400 * 2 // 3  # the estimate would let a batch of 266 through
    code, _, err = cli(capsys, main, "--data", tmp_path / "data", "--folds", 3, "--batch-size", fewest + 1)
    assert_user_error(code, err, f"--batch-size {fewest + 1} is larger than the {fewest} training images of a model")
    assert sorted(os.listdir(tmp_path)) == ["data"]


@pytest.mark.parametrize("case", FAILURES)
def test_failing_run_leaves_no_folders_or_files(capsys, tmp_path, case):
    write_data(tmp_path / "data")
    write_data(tmp_path / "bad", test=np.random.default_rng(0).bytes(4096))
    before = snapshot(tmp_path)
    argv, expected = FAILURES[case]
    code, _, err = cli(capsys, main, *argv, "--epochs", 1)  # default outputs: checkpoints/, reports/, ...
    assert_user_error(code, err, expected)
    assert sorted(os.listdir(tmp_path)) == ["bad", "data"] and snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- one run per checkpoint folder

def test_second_run_on_a_checkpoint_folder_in_use_is_refused_and_a_dead_holder_blocks_nothing(capsys, tmp_path, out):
    from files import folder_lock
    data = write_data(tmp_path / "data")
    argv = [*main_argv(data, out), "--widths", 4, 8, 8, "--report", ""]
    with folder_lock(str(out / "ckpt")):
        before = snapshot(out)
        code, stdout, err = cli(capsys, main, *argv)
        assert_user_error(code, err, f"--checkpoint-dir {out / 'ckpt'}: in use by another run (pid {os.getpid()} on {socket.gethostname()}:")
        assert "epoch" not in stdout
        assert snapshot(out) == before
    (out / "ckpt" / HOLDER_FILE).write_text("pid 999999: python main.py\n")  # what a kill -9'd holder leaves
    code, _, err = cli(capsys, main, *argv)
    assert (code, err) == (0, [])
    assert load_checkpoint(out / "ckpt" / "last.pt")["epoch"] == 1


def test_a_users_file_named_run_in_the_checkpoint_folder_is_left_alone(capsys, tmp_path, out):
    (out / "ckpt" / ".run").write_text("my run configuration\n")
    code, _, err = cli(capsys, main, *main_argv(write_data(tmp_path / "data"), out), "--widths", 4, 8, 8,
                       "--report", "")
    assert (code, err) == (0, [])
    assert (out / "ckpt" / ".run").read_text() == "my run configuration\n"
    assert not (out / "ckpt" / HOLDER_FILE).exists()  # the run's own holder file goes when it ends


def test_a_path_that_is_not_utf8_works_through_the_real_command_line(tmp_path, out):
    """File names are bytes on Linux; argv keeps undecodable ones as surrogates, which the
    lock's holder file (it quotes the command) must write back as the same bytes."""
    submission = os.fsencode(tmp_path) + b"/s\xe9.csv"
    argv = [*map(str, main_argv(write_data(tmp_path / "data"), out)), "--widths", "4", "8", "8", "--report", ""]
    argv[argv.index("--submission") + 1] = submission
    strict = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}  # stdout as in an en_US.UTF-8 terminal
    done = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), *argv], capture_output=True, timeout=300,
                          env=strict)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert b"wrote " + submission.replace(b"\xe9", b"\\udce9") in done.stdout  # escaped, not a traceback
    assert os.path.exists(submission) and len(open(submission).read().splitlines()) == ROWS + 1
    rebuild = done.stdout.split(b"the same file from the checkpoints alone: python ")[1].splitlines()[0]
    words = subprocess.run(["bash", "-c", "printf '%s\\0' " + rebuild.decode("ascii")], capture_output=True,
                           check=True).stdout.split(b"\0")[:-1]  # the words bash reads from the printed command
    assert words[words.index(b"--output") + 1] == submission  # so the command can be pasted as it is


def test_outputs_are_utf8_whatever_the_locale(tmp_path):
    """index.html declares UTF-8; under LC_ALL=C its '·' raised UnicodeEncodeError after training."""
    ascii_locale = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    page = tmp_path / "page.html"
    code = f"import sys; sys.path.insert(0, {ROOT!r}); import files; files.atomic_write_text({str(page)!r}, '\\u00b7')"
    done = subprocess.run([sys.executable, "-c", code], env=ascii_locale, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert page.read_bytes() == "\u00b7".encode("utf-8")


def test_a_reader_that_stops_reading_stdout_does_not_stop_the_run(tmp_path, out, monkeypatch):
    """`python main.py | head -1`: once head has exited, every write to stdout fails (BrokenPipeError)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "w", buffering=1) as pipe:  # line-buffered: the first line fails
        monkeypatch.setattr(sys, "stdout", pipe)
        argv = [*main_argv(write_data(tmp_path / "data"), out), "--widths", 4, 8, 8, "--report", ""]
        assert main.main([str(a) for a in argv]) == 0
        assert sys.stdout is not pipe  # guarded, not merely unread
    assert len((out / "final_submission.csv").read_text().splitlines()) == ROWS + 1


@pytest.mark.parametrize("buffering", [1, -1])
def test_stdout_on_a_full_disk_stops_the_run_with_one_line(capsys, tmp_path, out, monkeypatch, buffering):
    """`python main.py > log.txt` on a full disk (/dev/full: every write fails with ENOSPC): exit 2
    and one line on stderr, no warning from the last flush. Line-buffered (a terminal's way), the
    first line fails, before training; block-buffered (a file's way), the flush after the run
    does, and the epochs done are kept."""
    before = snapshot(out)
    with open("/dev/full", "w", buffering=buffering) as full:
        monkeypatch.setattr(sys, "stdout", full)
        argv = [*main_argv(write_data(tmp_path / "data"), out), "--widths", 4, 8, 8, "--report", ""]
        code = main.main([str(a) for a in argv])
        sys.stdout.flush()  # as at exit: quiet now
    err = capsys.readouterr().err.strip().splitlines()
    assert_user_error(code, err[:1], "stdout: cannot write (No space left on device)", "send the log to a file")
    if buffering == 1:
        assert len(err) == 1 and snapshot(out) == before
    else:
        assert err[-1].startswith("the epochs done are kept; once that is fixed, resume with: python ")
        assert (out / "final_submission.csv").read_text() != before["final_submission.csv"][0].decode()


def test_stderr_on_a_full_disk_keeps_the_exit_code(capsys, tmp_path, monkeypatch):
    """The error line cannot be written either: the exit code still says what happened."""
    with open("/dev/full", "w", buffering=1) as full:
        monkeypatch.setattr(sys, "stderr", full)
        assert inference.main(["--checkpoint", str(tmp_path / "none.pt"), "--input", str(tmp_path)]) == 2


def test_an_interrupt_after_the_reader_of_stderr_left_still_exits_130(tmp_path, out, monkeypatch):
    """`python main.py 2>&1 | head -1`, then Ctrl-C: the resume line meets a closed pipe."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    monkeypatch.setattr(trainer.Trainer, "run_epoch", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
    with open(write_end, "w", buffering=1) as pipe:
        monkeypatch.setattr(sys, "stderr", pipe)  # stdout's own fd would be mended first: stderr alone
        argv = [*main_argv(write_data(tmp_path / "data"), out), "--widths", 4, 8, 8, "--report", ""]
        assert main.main([str(a) for a in argv]) == 130


def test_ctrl_c_or_sigterm_during_inference_is_one_line_and_leaves_no_partial_file(capsys, tmp_path, out,
                                                                                   monkeypatch):
    def stopped_midway(*args, probs_file=None, **kwargs):
        probs_file.write("ImageId,p0\n1,0.5\n")  # part of the probabilities: never to be seen
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill` or a notebook's stop button sends it
    monkeypatch.setattr(inference, "predict_file", stopped_midway)
    (out / "p.csv").write_text(EARLIER_PROBABILITIES)
    before = snapshot(out)
    code, _, err = cli(capsys, inference, *inference_argv(write_data(tmp_path / "data") / "test.csv", out),
                       "--probs", out / "p.csv")
    assert code == 130 and err == ["interrupted; each output is either wholly written or as it was before"]
    assert snapshot(out) == before  # no .tmp- file, the old outputs untouched


@pytest.mark.parametrize("failing, step", [("p.csv", "fsync"), ("final_submission.csv", "fsync"),
                                           ("final_submission.csv", "replace")])
def test_inference_replaces_the_submission_and_its_probabilities_together_or_neither(capsys, tmp_path, out,
                                                                                   monkeypatch, failing, step):
    """A full disk while syncing either file (--probs is synced first), or the submission's rename
    failing after the probabilities' (a file mounted on its own is busy), leaves both as they
    were: never a new submission beside the old probabilities, or the other way round."""
    (out / "p.csv").write_text(EARLIER_PROBABILITIES)
    before, syncs, real_fsync, real_replace = snapshot(out), [], os.fsync, os.replace

    def fsync_on_a_full_disk(fd):
        if "/.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):  # an output's temp file, not the free-space probe
            syncs.append(fd)
            if len(syncs) == (1 if failing == "p.csv" else 2):
                raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    def replace_onto_a_busy_file(source, target):
        if str(target) == str(out / failing) and ".tmp-" in str(source) and not str(source).endswith(".old"):
            raise OSError(errno.EBUSY, "Device or resource busy")
        real_replace(source, target)
    if step == "fsync":
        monkeypatch.setattr(os, "fsync", fsync_on_a_full_disk)
    else:
        monkeypatch.setattr(os, "replace", replace_onto_a_busy_file)
    code, _, err = cli(capsys, inference, *inference_argv(write_data(tmp_path / "data") / "test.csv", out),
                       "--probs", out / "p.csv")
    assert_user_error(code, err, f"{out / failing}: cannot write: ")
    assert snapshot(out) == before  # no temp file or hard link left either


def test_inference_report_that_fails_midway_leaves_the_probabilities_as_they_were(capsys, tmp_path, out,
                                                                                 monkeypatch):
    """The old probabilities stay; new ones in the new report folder go, with the folder."""
    (out / "p.csv").write_text(EARLIER_PROBABILITIES)

    def report_on_a_full_disk(*args, **kwargs):
        raise OutputError(f"{out / 'rep' / 'mistakes.csv'}: cannot write: the disk is full")
    monkeypatch.setattr(inference, "write_report", report_on_a_full_disk)
    data = write_data(tmp_path / "data")
    code, _, err = cli(capsys, inference, "--checkpoint", out / "ckpt" / "best.pt", "--input", data / "train.csv",
                       "--report", out / "rep", "--probs", out / "p.csv")
    assert_user_error(code, err, "mistakes.csv: cannot write")
    assert (out / "p.csv").read_text() == EARLIER_PROBABILITIES and not list(out.glob(".tmp-*"))
    code, _, err = cli(capsys, inference, "--checkpoint", out / "ckpt" / "best.pt", "--input", data / "train.csv",
                       "--report", tmp_path / "new", "--probs", tmp_path / "new" / "p.csv")
    assert_user_error(code, err, "mistakes.csv: cannot write")
    assert not (tmp_path / "new").exists()


def test_inference_that_fails_midway_leaves_no_folder_it_made_for_probs(capsys, tmp_path, out):
    data = write_data(tmp_path / "data", test="\n".join(good_lines(False)) + "\n" + "1,2\n")  # a bad last line
    code, _, err = cli(capsys, inference, *inference_argv(data / "test.csv", out), "--probs", tmp_path / "new" / "p.csv")
    assert_user_error(code, err, "line 14, column 'pixel2': blank or NaN cell")
    assert not (tmp_path / "new").exists()


def test_an_output_name_whose_extension_is_most_of_it_is_written(capsys, tmp_path, out):
    """The temp file takes the output's extension only when short: ".tmp-XXXXXXXX" plus a
    250-byte one would pass the check on the output's name and then fail after the work."""
    name = tmp_path / ("x." + "c" * 250)
    code, _, err = cli(capsys, inference, *inference_argv(write_data(tmp_path / "data") / "test.csv", out)[:4],
                       "--output", name)
    assert (code, err) == (0, []) and len(name.read_text().splitlines()) == ROWS + 1


def test_bench_output_will_not_replace_another_kind_of_file(capsys, tmp_path):
    import bench
    keep = users_file(tmp_path / "keep.pt")
    code, _, err = cli(capsys, bench, "--data", write_data(tmp_path / "data"), "--output", keep)
    assert_user_error(code, err, f"--output {keep}: would replace a file that is not a bench.py result this suite wrote")
    assert keep.read_text() == "the user's own\n"


def test_the_next_run_replaces_what_the_first_wrote_even_a_submission_not_named_csv(capsys, tmp_path, out):
    argv = [*main_argv(write_data(tmp_path / "data"), out), "--widths", 4, 8, 8, "--report", tmp_path / "rep"]
    argv[argv.index("--submission") + 1] = tmp_path / "submission.txt"
    (tmp_path / "submission.txt").touch()  # an empty file holds nothing to lose
    for _ in range(2):  # the second run replaces the first one's files, which it recognises
        code, _, err = cli(capsys, main, *argv)
        assert (code, err) == (0, [])
    assert (tmp_path / "rep" / "confusion_matrix.png").exists() and (tmp_path / "rep" / "index.html").exists()


def users_torch_file(path):
    """Another project's checkpoint: a torch zip that this suite did not write, with a model_config too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 41, "model_config": {"hidden": 10}, "state_dict": {"w": torch.zeros(2)}}, path)
    return path


def users_plot(path):
    """The user's own matplotlib figure, in a folder with no report page of this suite."""
    import matplotlib.figure
    path.parent.mkdir(parents=True, exist_ok=True)
    matplotlib.figure.Figure(figsize=(1, 1)).savefig(path)
    return path


USERS_FILES_IN_THE_WAY = {  # case: (command, its argv for (tmp_path, out, data), the user's file made there)
    "inference --output is the user's train.csv beside the test.csv": (
        inference, lambda t, o, d: inference_argv(d / "test.csv", o)[:4] + ["--output", d / "train.csv"],
        lambda t, o, d: d / "train.csv"),
    "inference --probs is the run's history.csv": (
        inference, lambda t, o, d: inference_argv(d / "test.csv", o) + ["--probs", t / "history.csv"],
        lambda t, o, d: shutil.copy(users_file(t / "h.txt"), t / "history.csv") and t / "history.csv"),
    "main --report into a folder with the user's index.html": (
        main, lambda t, o, d: main_argv(d, o) + ["--report", t / "site"],
        lambda t, o, d: users_file(t / "site" / "index.html")),
    "inference --report into a folder with the user's mistakes.csv": (
        inference, lambda t, o, d: inference_argv(d / "train.csv", o)[:4] + ["--report", t / "site"],
        lambda t, o, d: users_file(t / "site" / "mistakes.csv")),
    "main --checkpoint-dir holding another project's best.pt": (
        main, lambda t, o, d: main_argv(d, o)[:2] + ["--checkpoint-dir", t / "ck", "--report", ""],
        lambda t, o, d: users_torch_file(t / "ck" / "best.pt")),
    "inference --report into a folder with the user's own matplotlib figure": (
        inference, lambda t, o, d: inference_argv(d / "train.csv", o)[:4] + ["--report", t / "figs"],
        lambda t, o, d: users_plot(t / "figs" / "confusion_matrix.png")),
    "inference --probs is a submission": (
        inference, lambda t, o, d: inference_argv(d / "test.csv", o) + ["--probs", t / "sub.csv"],
        lambda t, o, d: shutil.copy(o / "final_submission.csv", t / "sub.csv") and t / "sub.csv"),
    "main --checkpoint-dir holding another project's history.csv": (
        main, lambda t, o, d: main_argv(d, o)[:2] + ["--checkpoint-dir", t / "ck", "--report", ""],
        lambda t, o, d: users_file(t / "ck" / "history.csv", "epoch,train_loss,val_loss\n1,0.5,0.4\n")),
    "main --checkpoint-dir holding another project's member2/last.pt": (
        main, lambda t, o, d: main_argv(d, o)[:2] + ["--checkpoint-dir", t / "ck", "--ensemble", 2, "--report", ""],
        lambda t, o, d: users_torch_file(t / "ck" / "member2" / "last.pt")),
}


def test_a_report_folder_from_before_figures_were_marked_is_replaced(capsys, tmp_path, out):
    """Earlier versions' figures carry only matplotlib's own mark: beside this suite's page they count as ours."""
    data = write_data(tmp_path / "data")
    users_plot(tmp_path / "rep" / "confusion_matrix.png")
    (tmp_path / "rep" / "index.html").write_text("<!DOCTYPE html>\n<html><head><title>Digit Recognizer report: "
                                                 "train.csv</title></head></html>\n")
    code, _, err = cli(capsys, inference, *inference_argv(data / "train.csv", out)[:4], "--report", tmp_path / "rep")
    assert (code, err) == (0, [])
    assert b"Source\x00Digit Recognizer report" in (tmp_path / "rep" / "confusion_matrix.png").read_bytes()[:4096]


@pytest.mark.parametrize("command", [main, inference], ids=["main", "inference"])
def test_a_pipe_named_index_html_in_the_report_folder_is_refused_without_reading_it(capsys, tmp_path, out, command):
    data = write_data(tmp_path / "data")
    (tmp_path / "rep").mkdir()
    fifo(tmp_path / "rep" / "index.html")  # reading it would wait for a writer forever
    argv = main_argv(data, out) if command is main else inference_argv(data / "train.csv", out)[:4]
    code, _, err = cli(capsys, command, *argv, "--report", tmp_path / "rep")
    assert_user_error(code, err, f"--report {tmp_path / 'rep' / 'index.html'}: is a device, pipe or socket")


def test_checkpoints_and_a_report_cut_short_of_earlier_versions_are_replaced(capsys, tmp_path, out):
    """Earlier ModelConfigs began with 'widths'; a report cut short (or older than index.html)
    left its per-class table and unmarked figures: all of them this suite's, so replaced."""
    data = write_data(tmp_path / "data")
    config = {"widths": (4, 8, 8), "arch": "cnn", "dropout": 0.1, "num_classes": 10}  # the older field order
    torch.save({"model_config": config, "model": DigitRecognizerModel(ModelConfig(widths=(4, 8, 8))).state_dict()},
               out / "ckpt" / "best.pt")
    users_file(tmp_path / "rep" / "per_class_accuracy.csv", ",".join(report.PER_CLASS_COLUMNS) + "\n0,1,1,1.0,,0\n")
    users_plot(tmp_path / "rep" / "confusion_matrix.png")
    code, _, err = cli(capsys, main, *main_argv(data, out), "--widths", 4, 8, 8, "--report", tmp_path / "rep")
    assert (code, err) == (0, [])
    assert b"Source\x00Digit Recognizer report" in (tmp_path / "rep" / "confusion_matrix.png").read_bytes()[:4096]


def test_a_report_skips_the_files_it_will_not_write(capsys, tmp_path, out):
    """inference.py --report draws no curves and no test set; --full-train writes no report."""
    data = write_data(tmp_path / "data")
    users_plot(tmp_path / "rep" / "learning_curves.png")
    users_file(tmp_path / "rep2" / "index.html")
    before = snapshot(tmp_path / "rep"), snapshot(tmp_path / "rep2")
    code, _, err = cli(capsys, inference, *inference_argv(data / "train.csv", out)[:4], "--report", tmp_path / "rep")
    assert (code, err) == (0, [])
    code, _, err = cli(capsys, main, *main_argv(data, out), "--full-train", "--widths", 4, 8, 8,
                       "--report", tmp_path / "rep2")
    assert (code, err) == (0, [])
    assert snapshot(tmp_path / "rep2") == before[1]
    assert snapshot(tmp_path / "rep")["learning_curves.png"] == before[0]["learning_curves.png"]


@pytest.mark.parametrize("case", USERS_FILES_IN_THE_WAY)
def test_an_output_replaces_only_a_file_this_suite_wrote(capsys, tmp_path, out, case):
    """An earlier run's files are recognised by their first bytes; a user's file of the same
    name is refused before anything runs, and stays as it was."""
    module, argv, users = USERS_FILES_IN_THE_WAY[case]
    data = write_data(tmp_path / "data")
    path = users(tmp_path, out, data)
    before = snapshot(tmp_path)
    code, stdout, err = cli(capsys, module, *argv(tmp_path, out, data))
    assert_user_error(code, err, f"{path}: would replace a file that is not a", "this suite wrote")
    assert "data:" not in stdout and snapshot(tmp_path) == before


@pytest.mark.parametrize("command", [inference, export], ids=["inference", "export"])
@pytest.mark.parametrize("again, expected", [("./ckpt//best.pt", "is ckpt/best.pt again; each checkpoint counts once"),
                                             ("copy.pt", "holds the same bytes as ckpt/best.pt, so the same model")],
                         ids=["the same path", "a copy"])
def test_one_checkpoint_given_twice_is_refused_as_it_would_count_double(capsys, tmp_path, out, monkeypatch, command,
                                                                        again, expected):
    monkeypatch.chdir(out)
    shutil.copy("ckpt/best.pt", "copy.pt")
    argv = ["--checkpoint", "ckpt/best.pt", again, "--output", tmp_path / "x.onnx"]
    if command is inference:
        argv = [*argv[:3], "--input", write_data(tmp_path / "data") / "test.csv", "--output", tmp_path / "x.csv"]
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, command, *argv)
    assert_user_error(code, err, f"--checkpoint {again}: {expected}")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", [inference, export], ids=["inference", "export"])
def test_a_repeated_checkpoint_flag_adds_its_paths(capsys, tmp_path, out, monkeypatch, command):
    """--checkpoint a --checkpoint b means a and b, as --checkpoint a b does (argparse kept only b)."""
    monkeypatch.chdir(out)
    shutil.copy("ckpt/best.pt", "copy.pt")
    inputs = ["--input", write_data(tmp_path / "data") / "test.csv"] if command is inference else []
    code, _, err = cli(capsys, command, "--checkpoint", "ckpt/best.pt", "--checkpoint", "copy.pt", *inputs,
                       "--output", tmp_path / ("x.csv" if command is inference else "x.onnx"))
    assert_user_error(code, err, "--checkpoint copy.pt: holds the same bytes as ckpt/best.pt")


def test_two_identical_files_that_are_no_checkpoints_are_called_what_they_are(capsys, tmp_path, out, monkeypatch):
    monkeypatch.chdir(out)
    open("e1.pt", "w").close()
    open("e2.pt", "w").close()
    code, _, err = cli(capsys, inference, "--checkpoint", "e1.pt", "e2.pt", "--input",
                       write_data(tmp_path / "data") / "test.csv", "--output", tmp_path / "x.csv")
    assert_user_error(code, err, "e1.pt: not a readable checkpoint")


def test_the_logged_rebuild_command_keeps_the_chosen_device(capsys, tmp_path, out):
    """A GPU machine's `inference.py` would otherwise pick cuda for a run trained with --device cpu."""
    argv = [*main_argv(write_data(tmp_path / "data"), out), "--widths", 4, 8, 8, "--report", ""]
    code, stdout, err = cli(capsys, main, *argv)
    command = shlex.split(stdout.split("the same file from the checkpoints alone: ")[1].splitlines()[0])
    assert (code, err, command[-2:]) == (0, [], ["--device", "cpu"])
    command[command.index("--output") + 1] = str(tmp_path / "rebuilt.csv")
    assert inference.main(command[2:]) == 0
    assert (tmp_path / "rebuilt.csv").read_bytes() == (out / "final_submission.csv").read_bytes()


def test_a_checkpoint_dir_that_links_to_a_folder_still_to_be_made_makes_it(capsys, tmp_path, out):
    (tmp_path / "ck").symlink_to(tmp_path / "volume" / "ck")
    argv = [*main_argv(write_data(tmp_path / "data"), out), "--widths", 4, 8, 8, "--report", ""]
    argv[argv.index("--checkpoint-dir") + 1] = tmp_path / "ck"
    code, _, err = cli(capsys, main, *argv)
    assert (code, err) == (0, []) and (tmp_path / "ck").is_symlink()
    assert sorted(os.listdir(tmp_path / "volume" / "ck")) == ["best.pt", "history.csv", "last.pt"]


def test_a_checkpoint_dir_through_a_missing_folder_and_dotdot_makes_no_stray_folder(capsys, tmp_path, out,
                                                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [*main_argv(write_data(tmp_path / "data"), out), "--widths", 4, 8, 8, "--report", ""]
    argv[argv.index("--checkpoint-dir") + 1] = "nx/../ck"
    code, _, err = cli(capsys, main, *argv)
    assert (code, err) == (0, []) and (tmp_path / "ck" / "best.pt").exists() and not (tmp_path / "nx").exists()
    (tmp_path / "volume" / "inner").mkdir(parents=True)
    (tmp_path / "lnk").symlink_to(tmp_path / "volume" / "inner")
    argv[argv.index("--checkpoint-dir") + 1] = "lnk/../ck"  # beside the link's target, as the shell has it
    options, _ = main.parse_args([str(a) for a in argv])
    assert os.path.realpath(options.checkpoint_dir) == os.path.realpath(tmp_path / "volume" / "ck")


def test_an_empty_checkpoint_dir_is_refused_before_the_data_is_read(capsys, tmp_path, out):
    argv = main_argv(write_data(tmp_path / "data"), out)
    argv[argv.index("--checkpoint-dir") + 1] = ""
    with pytest.raises(SystemExit) as stop:
        main.parse_args([str(a) for a in argv])
    assert stop.value.code == 2 and "--checkpoint-dir is empty" in capsys.readouterr().err


def test_probs_path_that_is_the_report_folder_is_refused_before_scoring(capsys, tmp_path, out):
    data = write_data(tmp_path / "data")
    code, stdout, err = cli(capsys, inference, "--checkpoint", out / "ckpt" / "best.pt", "--input", data / "train.csv",
                            "--report", tmp_path / "rep", "--probs", tmp_path / "rep")
    assert_user_error(code, err, f"--probs {tmp_path / 'rep'}: is a folder of the --report output")
    assert not (tmp_path / "rep").exists() and "per-class" not in stdout


def test_an_output_that_is_a_symlink_writes_its_target_and_keeps_the_link(capsys, tmp_path, out):
    target = tmp_path / "kept" / "submission.csv"
    target.parent.mkdir()
    target.write_text("ImageId,Label\n1,7\n")  # an older submission
    link = symlink(tmp_path / "link.csv", target)
    argv = inference_argv(write_data(tmp_path / "data") / "test.csv", out)
    argv[argv.index("--output") + 1] = link
    code, _, err = cli(capsys, inference, *argv)
    assert (code, err) == (0, [])
    assert link.is_symlink() and target.read_text().startswith("ImageId,Label\n1,")


def test_an_output_that_is_a_loop_of_symlinks_is_refused_and_stays_a_link(capsys, tmp_path, out):
    loop = symlink(tmp_path / "loop1", tmp_path / "loop2")
    symlink(tmp_path / "loop2", loop)
    argv = inference_argv(write_data(tmp_path / "data") / "test.csv", out)
    argv[argv.index("--output") + 1] = loop
    code, _, err = cli(capsys, inference, *argv)
    assert_user_error(code, err, f"--output {loop}: is a loop of symlinks")
    assert loop.is_symlink() and (tmp_path / "loop2").is_symlink()


@pytest.mark.parametrize("held, used, says", [
    ("ckpt", "ckpt/member1", "--checkpoint-dir {out}/ckpt/member1: is inside {out}/ckpt, a folder another run "
                             "holds (pid {pid} on {host}:"),
    ("ckpt/member1", "ckpt", "--checkpoint-dir {out}/ckpt: in use by another run (a run in a folder inside it)"),
])
def test_a_run_inside_another_runs_checkpoint_folder_is_refused(capsys, tmp_path, out, held, used, says):
    from files import folder_lock
    data = write_data(tmp_path / "data")
    argv = [*main_argv(data, out), "--widths", 4, 8, 8, "--report", ""]
    argv[argv.index("--checkpoint-dir") + 1] = out / used
    folders = lambda: sorted(p for p in out.rglob("*") if p.is_dir())  # noqa: E731
    with folder_lock(str(out / held)):
        before, folders_before = snapshot(out), folders()
        code, stdout, err = cli(capsys, main, *argv)
        assert_user_error(code, err, says.format(out=out, pid=os.getpid(), host=socket.gethostname()))
        assert "epoch" not in stdout and snapshot(out) == before
        assert folders() == folders_before  # not even the empty folder it would have used


def test_a_holder_on_another_machine_is_named_as_it_wrote_itself(tmp_path):
    """A shared disk: its pid cannot be looked up here, so its own line stands."""
    from files import _holder
    (tmp_path / HOLDER_FILE).write_text(f"pid 1 on not-{socket.gethostname()}: python main.py\n")
    assert _holder(str(tmp_path), otherwise="?") == f"pid 1 on not-{socket.gethostname()}: python main.py"


@pytest.mark.parametrize("pid", ["99999999999999999999", "0", "-1", "x"])
def test_a_holder_file_with_an_impossible_pid_is_not_named(tmp_path, pid):
    from files import _holder
    (tmp_path / HOLDER_FILE).write_text(f"pid {pid} on {socket.gethostname()}: python main.py\n")
    assert _holder(str(tmp_path), otherwise="a run in a folder inside it") == "a run in a folder inside it"


def test_a_killed_runs_holder_file_is_not_named_as_the_holder(capsys, tmp_path, out):
    """A SIGKILLed run leaves its holder file behind; the one holding the folder now is a run inside it."""
    from files import folder_lock
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / "ckpt" / HOLDER_FILE).write_text(f"pid {dead.stdout.strip()}: python main.py --checkpoint-dir ckpt\n")
    argv = [*main_argv(write_data(tmp_path / "data"), out), "--widths", 4, 8, 8, "--report", ""]
    with folder_lock(str(out / "ckpt" / "member1")):
        code, _, err = cli(capsys, main, *argv)
    assert_user_error(code, err, f"--checkpoint-dir {out / 'ckpt'}: in use by another run (a run in a folder inside it)")


def test_two_runs_never_share_a_report_folder(capsys, tmp_path, out):
    """Each run locks its --report folder as it locks its --checkpoint-dir: two runs with their own
    checkpoints but the default reports/ would mix one's page with the other's tables."""
    from files import folder_lock
    data = write_data(tmp_path / "data")
    argv = [*main_argv(data, out), "--widths", 4, 8, 8, "--report", out / "rep"]
    with folder_lock(str(out / "rep"), "--report"):
        before = snapshot(out)
        code, stdout, err = cli(capsys, main, *argv)
        assert_user_error(code, err, f"--report {out / 'rep'}: in use by another run (pid {os.getpid()} on {socket.gethostname()}:")
        assert "epoch" not in stdout and snapshot(out) == before
        code, _, err = cli(capsys, inference, "--checkpoint", out / "ckpt" / "best.pt", "--input", data / "train.csv",
                           "--report", out / "rep")  # inference.py's report too
        assert_user_error(code, err, f"--report {out / 'rep'}: in use by another run (pid {os.getpid()} on {socket.gethostname()}:")
        assert snapshot(out) == before
    code, _, err = cli(capsys, inference, "--checkpoint", out / "ckpt" / "best.pt", "--input", data / "train.csv",
                       "--report", out / "rep")
    assert (code, err) == (0, []) and not (out / "rep" / HOLDER_FILE).exists()
    code, _, err = cli(capsys, main, *argv[:-1], out / "ckpt" / "rep")  # inside its own checkpoint folder
    assert (code, err) == (0, []) and (out / "ckpt" / "rep" / "index.html").exists()
    assert not (out / "ckpt" / "rep" / HOLDER_FILE).exists() and not (out / "ckpt" / HOLDER_FILE).exists()


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["Ctrl-C", "SIGTERM"])
@pytest.mark.parametrize("command", [main, inference])
def test_an_interrupt_that_a_library_turns_into_its_own_error_is_still_an_interrupt(capsys, tmp_path, out,
                                                                                    monkeypatch, stop, command):
    """Stopped mid-drawing, matplotlib caught the KeyboardInterrupt and raised ValueError: a traceback."""
    def drawing(*args):
        try:
            os.kill(os.getpid(), stop)
            time.sleep(5)  # the handler raises here
        except KeyboardInterrupt:
            raise ValueError("Invalid affine transformation matrix") from None
    monkeypatch.setattr(report, "_draw_figures", drawing)
    data = write_data(tmp_path / "data")
    if command is main:
        argv = [*main_argv(data, out), "--widths", 4, 8, 8, "--report", out / "rep"]
    else:
        argv = ["--checkpoint", out / "ckpt" / "best.pt", "--input", data / "train.csv", "--report", out / "rep"]
    code, _, err = cli(capsys, command, *argv)
    says = "interrupted; resume with: " if command is main else "interrupted; each output is either wholly written"
    assert code == 130 and err[-1].startswith(says), err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("flag", ["--checkpoint-dir", "--report"])
def test_a_run_folder_that_cannot_be_one_is_named_as_given(capsys, tmp_path, out, flag):
    """Not the lock file the run keeps in it (notes.txt/.digit-recognizer-run), nor 'give a file path'."""
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    argv = main_argv(write_data(tmp_path / "data"), out)
    for folder, says in [(tmp_path / "notes.txt", "is a file, not a folder"),
                         (tmp_path / "notes.txt" / "sub", f"{tmp_path / 'notes.txt'} is a file, not a folder"),
                         (tmp_path / "loop", "is a loop of symlinks; give a folder path")]:
        code, _, err = cli(capsys, main, *argv, flag, folder)
        assert_user_error(code, err, f"{flag} {folder}: {says}")
        assert HOLDER_FILE not in err[0]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_sigint_the_caller_ignores_stays_ignored(capsys, tmp_path, out, monkeypatch):
    """A shell script's background job ignores SIGINT (Ctrl-C on the script leaves it running)."""
    monkeypatch.setattr(signal, "signal", signal.signal)  # restored after the test, whatever happens
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        def epoch_with_a_ctrl_c(self, epoch, bar, run_epoch=trainer.Trainer.run_epoch):
            os.kill(os.getpid(), signal.SIGINT)
            return run_epoch(self, epoch, bar)
        monkeypatch.setattr(trainer.Trainer, "run_epoch", epoch_with_a_ctrl_c)
        code, _, err = cli(capsys, main, *main_argv(write_data(tmp_path / "data"), out), "--widths", 4, 8, 8,
                           "--report", "")
        assert (code, err) == (0, []) and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_a_folder_named_as_the_lock_file_is_named_as_such(capsys, tmp_path, out):
    (out / "ck" / HOLDER_FILE).mkdir(parents=True)
    argv = main_argv(write_data(tmp_path / "data"), out)
    code, _, err = cli(capsys, main, *argv, "--checkpoint-dir", out / "ck")
    assert_user_error(code, err, f"--checkpoint-dir {out / 'ck'}: the run's lock file {out / 'ck' / HOLDER_FILE} "
                                 f"is a folder; move it away")


def test_a_report_folder_holding_both_runs_checkpoint_folders_is_not_shared(capsys, tmp_path, out):
    """Two runs with --report shared and their checkpoints in shared/ck1 and shared/ck2: the
    second is refused (each checkpoint lock alone is only shared on the folder above it)."""
    from files import folder_lock
    data = write_data(tmp_path / "data")
    shared = out / "shared"
    argv = [*main_argv(data, out), "--widths", 4, 8, 8, "--report", shared]
    argv[argv.index("--checkpoint-dir") + 1] = shared / "ck2"
    with folder_lock(str(shared / "ck1")):  # the first run, still training
        before = snapshot(out)
        code, stdout, err = cli(capsys, main, *argv)
        assert_user_error(code, err, f"--report {shared}: in use by another run (a run in a folder inside it)")
        assert "epoch" not in stdout and snapshot(out) == before
    code, _, err = cli(capsys, main, *argv)  # alone, it locks the report folder, then its checkpoints inside
    assert (code, err) == (0, []) and (shared / "index.html").exists() and (shared / "ck2" / "best.pt").exists()
    assert not (shared / HOLDER_FILE).exists() and not (shared / "ck2" / HOLDER_FILE).exists()


def test_member_folders_an_earlier_bigger_ensemble_left_are_refused(capsys, tmp_path, out):
    data = write_data(tmp_path / "data")
    (out / "ckpt" / "member3").mkdir(parents=True)
    (out / "ckpt" / "member3" / "best.pt").write_bytes(b"an earlier run's member")
    before = snapshot(out)
    code, stdout, err = cli(capsys, main, *main_argv(data, out), "--ensemble", 2, "--widths", 4, 8, 8)
    assert_user_error(code, err, f"--checkpoint-dir {out / 'ckpt'}: {out / 'ckpt' / 'member3'} left by an earlier "
                                 f"run with more members; `member*/best.pt` would mix them with this run's 2")
    assert "epoch" not in stdout and snapshot(out) == before


def test_a_member3_that_holds_no_checkpoint_is_no_earlier_member(capsys, tmp_path, out):
    """A file, or a folder without best.pt or last.pt, named member3 mixes nothing into member*/best.pt."""
    data = write_data(tmp_path / "data")
    (out / "ckpt" / "member4").mkdir(parents=True)
    (out / "ckpt" / "member3").write_text("notes")
    code, _, err = cli(capsys, main, *main_argv(data, out), "--ensemble", 2, "--widths", 4, 8, 8, "--report", "")
    assert (code, err) == (0, []) and (out / "ckpt" / "member3").read_text() == "notes"


def test_a_line_break_inside_a_cell_or_a_flag_is_still_one_line(capsys, tmp_path, out):
    (tmp_path / "test.csv").write_text(edit_cell('"1\n2"')(good_lines(False)))
    code, _, err = cli(capsys, inference, *inference_argv(tmp_path / "test.csv", out))
    assert_user_error(code, err, "'1\\n2' is not a whole number")
    with pytest.raises(SystemExit) as exit_info:
        main.parse_args(["--epochs", "1\n2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "'1\\n2' is not an integer" in err[0]


@pytest.mark.parametrize("world_size, says", [("abc", "WORLD_SIZE='abc' in the environment is not a process count"),
                                              ("0", "WORLD_SIZE='0'"),
                                              ("2", "WORLD_SIZE=2 is set but not RANK"),
                                              ("2 RANK=x", "RANK='x' in the environment is not a number from 0 to 1"),
                                              ("2 RANK=5", "RANK='5' in the environment is not a number from 0 to 1"),
                                              ("2 MASTER_PORT=notaport", "MASTER_PORT='notaport'"),
                                              ("2 LOCAL_WORLD_SIZE=0", "LOCAL_WORLD_SIZE='0' in the environment is "
                                                                       "not a number from 1 to 2"),
                                              ("2 LOCAL_WORLD_SIZE=abc", "LOCAL_WORLD_SIZE='abc'"),
                                              ("2 MASTER_ADDR=", "MASTER_ADDR is empty in the environment"),
                                              ("\u00b2", "WORLD_SIZE='\u00b2' in the environment is not a process")])
def test_a_world_size_torchrun_never_sets_is_one_line(capsys, monkeypatch, world_size, says):
    world_size, *wrong = world_size.split()
    launched = {"RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    for name in [*launched, "LOCAL_WORLD_SIZE"]:
        monkeypatch.delenv(name, raising=False)
    for name, value in (setting.split("=") for setting in wrong):  # torchrun's variables, one of them bad
        for good_name, good_value in launched.items():
            monkeypatch.setenv(good_name, good_value)
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WORLD_SIZE", world_size)
    with pytest.raises(SystemExit) as exit_info:
        main.parse_args([])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and says in err[0]


# ----------------------------------------------------------------------------- export.py

@pytest.mark.parametrize("flag, value", [("--tolerance", "nan"), ("--tolerance", "inf"), ("--tolerance", "0"),
                                         ("--check", "-1"), ("--check", "1000000000")])
def test_export_check_flags_are_range_checked(capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        export.parse_args(["--checkpoint", "x.pt", flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and f"{flag}: {value} is out of range" in err[0]
