"""The commands as a newcomer and a notebook use them: no paths given, presets, --help, the
Python entry point, and a second architecture added in one file."""

import os
import shutil
import signal
import subprocess
import zipfile

import pandas as pd
import pytest
import torch
import torch.nn as nn

import DigitRecognizerModel
import inference
import main
from cli import UserError, flag_name, setting_fields, shell_word
from conftest import assert_user_error, cli, make_digits, snapshot, write_csv
from recipe import Recipe

TINY = ["--epochs", "1", "--widths", "4", "8", "8", "--batch-size", "32", "--report", "", "--device", "cpu"]


def write_synthetic_kaggle_data(folder):
    """train.csv (200 rows) and test.csv (30) of synthetic digits, in a new folder."""
    folder.mkdir(parents=True)
    write_csv(folder / "train.csv", *make_digits(200, seed=1))
    write_csv(folder / "test.csv", make_digits(30, seed=2)[0])
    return folder


def put_data(where, tmp_path, kaggle_input):
    """The synthetic Kaggle data where a newcomer may have it; returns the folder to keep unchanged."""
    if where == "data/ CSVs":
        return write_synthetic_kaggle_data(tmp_path / "data")
    if where == "data/digit-recognizer.zip (Kaggle CLI)":
        csvs = write_synthetic_kaggle_data(tmp_path / "unzipped")
        (tmp_path / "data").mkdir()
        with zipfile.ZipFile(tmp_path / "data" / "digit-recognizer.zip", "w") as archive:
            for name in ("train.csv", "test.csv"):
                archive.write(csvs / name, name)
        shutil.rmtree(csvs)
        return tmp_path / "data"
    return write_synthetic_kaggle_data(kaggle_input / "digit-recognizer")  # a Kaggle Notebook's read-only input


@pytest.mark.parametrize("where", ["data/ CSVs", "data/digit-recognizer.zip (Kaggle CLI)", "Kaggle Notebook input"])
def test_newcomer_runs_main_and_inference_without_paths(capsys, tmp_path, kaggle_input, where):
    data = put_data(where, tmp_path, kaggle_input)
    before = snapshot(data)
    code, stdout, err = cli(capsys, main, "--preset", "fast", *TINY)
    assert (code, err) == (0, [])
    assert "data: 180 train / 20 validation / 30 test images" in stdout
    assert len(pd.read_csv("checkpoints/history.csv")) == 1  # --epochs 1 overrides the preset's 4
    submission = pd.read_csv("final_submission.csv")
    assert submission["ImageId"].tolist() == list(range(1, 31))
    os.rename("final_submission.csv", "from_main.csv")
    code, stdout, err = cli(capsys, inference, "--checkpoint", "checkpoints/best.pt")  # no --input, no --output
    assert (code, err) == (0, []) and "wrote final_submission.csv (30 rows)" in stdout
    assert open("final_submission.csv").read() == open("from_main.csv").read()
    assert snapshot(data) == before  # nothing written into the data's folder


@pytest.mark.parametrize("command", [main, inference], ids=["main", "inference"])
def test_no_data_anywhere_says_where_it_looked_and_how_to_get_it(capsys, tmp_path, kaggle_input, command):
    argv = TINY if command is main else ["--checkpoint", "best.pt"]
    code, _, err = cli(capsys, command, *argv)
    names = "train.csv or test.csv" if command is main else "test.csv"
    looked = ", ".join([os.path.join("data", ""), os.path.join("data", "digit-recognizer.zip"),
                        os.path.join(kaggle_input, "digit-recognizer", "")])
    assert_user_error(code, err, f"error: found no {names} in {looked}; ",
                      "kaggle competitions download -c digit-recognizer -p data",
                      "in a Kaggle Notebook with Add data -> Digit Recognizer competition")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- presets and --help

def test_preset_sets_its_settings_unless_a_flag_is_given():
    assert main.parse_args(["--preset", "fast"])[1].train.epochs == 3
    assert main.parse_args(["--preset", "fast", "--epochs", "2"])[1].train.epochs == 2
    assert main.parse_args([])[1].train.epochs == 30


def test_help_shows_every_setting_flag_with_its_default_and_the_preset_differences(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: 30; --preset fast: 3)" in text
    assert "(default: 0; --preset best: 5)" in text and "(default: on; --preset fast: off)" in text
    assert "(default: none; --preset best: deotte)" in text
    assert "(default: 16 32 128; --arch deotte: 32 64 128)" in text and "(default: 0.1; --arch deotte: 0.4)" in text
    assert "--arch {cnn,deotte}" in text and "--mix {none,cnn,deotte}" in text  # the choices, not a bare ARCH
    helps = {action.dest: " ".join(action.help.split()) for action in main.build_parser()._actions}
    for _, field in setting_fields(Recipe()):
        assert flag_name(field) in text and "(default: " in helps[field.name] and helps[field.name] in text


# ----------------------------------------------------------------------------- Python entry point

def test_run_returns_the_results_and_raises_user_error(tmp_path, kaggle_input):
    data = write_synthetic_kaggle_data(tmp_path / "d")
    lines = []
    torch.manual_seed(42)
    expected_next_draw = torch.rand(3, generator=torch.Generator().set_state(torch.get_rng_state()))
    results = main.run(data=str(data), epochs=1, widths=(4, 8, 8), batch_size=32, report="", device="cpu",
                       checkpoint_dir="ck", submission="sub.csv", log=lines.append)
    assert torch.equal(torch.rand(3), expected_next_draw)  # the caller's random stream goes on as it was
    assert set(results) == {"histories", "val_accuracy", "checkpoints", "submission", "seconds", "recipe"}
    assert [len(h) for h in results["histories"]] == [1] and 0 <= results["val_accuracy"] <= 1
    assert results["checkpoints"] == [os.path.join("ck", "best.pt")] and results["submission"] == "sub.csv"
    assert results["recipe"].model.widths == (4, 8, 8) and results["recipe"].train.epochs == 1
    assert results["histories"][0][0]["val_accuracy"] == results["val_accuracy"]
    assert len(pd.read_csv("sub.csv")) == 30 and any(line.startswith("wrote sub.csv") for line in lines)
    for bad in ({"lr": float("nan")}, {"no_such_flag": 1}, {"data": str(tmp_path / "nowhere")}, {"tta": "no"},
                {"epochs": True}, {"log": None}, {"no_tta": True}, {"help": True}):
        with pytest.raises(UserError):  # not SystemExit: a notebook kernel keeps running
            main.run(**bad, report="", checkpoint_dir="ck2", submission="sub2.csv")
    assert not os.path.exists("ck2") and not os.path.exists("sub2.csv")
    with pytest.raises(UserError, match=r"^run\(epoch=1\): no such setting"):  # not taken as epochs=1
        main.run(epoch=1)
    for value in (True, [], "x"):  # no_tta=[] once turned TTA off
        with pytest.raises(UserError, match=r"^run\(no_tta=.*\): write tta=False or tta=True$"):
            main.run(no_tta=value)


def test_main_restores_the_sigterm_handler_it_found(capsys, tmp_path, kaggle_input):
    def handler(signum, frame):
        pass
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        assert main.main(["--data", str(tmp_path / "nowhere")]) == 2
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------- a second architecture

class Toy(nn.Module):
    """The smallest architecture: one linear layer on the pixels."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.linear = nn.Linear(28 * 28, config.num_classes)

    def forward(self, images):
        return self.linear(images.flatten(1))

    def fuse_batchnorm_(self):  # nothing to fold
        return self.eval()


def test_an_architecture_registered_in_one_file_trains_and_predicts(capsys, tmp_path, monkeypatch, kaggle_input):
    monkeypatch.setattr(DigitRecognizerModel, "ARCHITECTURES", dict(DigitRecognizerModel.ARCHITECTURES))
    DigitRecognizerModel.register("toy")(Toy)
    write_synthetic_kaggle_data(tmp_path / "data")
    code, _, err = cli(capsys, main, "--arch", "toy", *TINY)
    assert (code, err) == (0, [])
    state = DigitRecognizerModel.load_checkpoint("checkpoints/best.pt")
    assert state["model_config"]["arch"] == "toy" and set(state["model"]) == {"linear.weight", "linear.bias"}
    code, _, err = cli(capsys, inference, "--checkpoint", "checkpoints/best.pt", "--tta", "--output", "again.csv")
    assert (code, err) == (0, [])
    assert open("again.csv").read() == open("final_submission.csv").read()
    model = DigitRecognizerModel.model_from_checkpoint(state).eval()
    images = make_digits(30, seed=2)[0]
    expected = inference.predict_probs([model], images, torch.device("cpu"), tta=True).argmax(1)
    assert pd.read_csv("again.csv")["Label"].tolist() == expected.tolist()


def test_elastic_sigma_without_the_elastic_distortion_is_refused_not_ignored(capsys):
    with pytest.raises(SystemExit) as stop:
        main.parse_args(["--elastic-sigma", "20"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "--elastic-sigma 20 shapes the elastic distortion, which is off" in err[0]
    assert main.parse_args(["--elastic-sigma", "20", "--elastic", "2"])[1].augment.elastic_sigma == 20


@pytest.mark.parametrize("name", ["plain.csv", "it's a file.csv", "caf\u00e9.csv", os.fsdecode(b"s\xe9.csv"),
                                  "two\nlines.csv", "back\\slash\x01.csv", "$HOME.csv"])
def test_printed_commands_quote_every_file_name_so_bash_reads_back_its_bytes(name):
    word = shell_word(name)
    assert word.isprintable() and "\n" not in word  # one line on any terminal
    read_back = subprocess.run(["bash", "-c", f"printf '%s' {word}"], capture_output=True, check=True).stdout
    assert read_back == os.fsencode(name)
