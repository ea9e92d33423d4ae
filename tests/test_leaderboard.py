"""Ensembles, test-time augmentation and full-data refits, on tiny synthetic data."""

import os
import re
import shlex

import numpy as np
import pandas as pd
import pytest
import torch

import inference
import main
import report
from DigitRecognizerModel import DigitRecognizerModel, ModelConfig, load_checkpoint
from conftest import make_digits, write_csv
from dataloader import warp
from trainer import EMA


def test_ensemble_with_tta_matches_inference_on_the_same_checkpoints(kaggle_dir, tmp_path, capsys):
    ck = tmp_path / "ck"
    argv = ["--data", str(kaggle_dir), "--epochs", "2", "--ensemble", "2", "--tta", "--widths", "8", "16", "16",
            "--checkpoint-dir", str(ck), "--submission", str(tmp_path / "main.csv"), "--report", ""]
    assert main.main(argv) == 0
    members = [ck / "member1" / "best.pt", ck / "member2" / "best.pt"]
    seeds = [load_checkpoint(str(path))["identity"]["seed"] for path in members]
    assert seeds == [0, 1]
    assert "validation accuracy of the submitted predictor (2 model(s), TTA)" in capsys.readouterr().out
    # No --tta: inference takes it from the recipe stored in the checkpoints, as main.py used it.
    assert inference.main(["--checkpoint", *map(str, members), "--input", str(kaggle_dir),
                           "--output", str(tmp_path / "inf.csv")]) == 0
    assert (tmp_path / "main.csv").read_bytes() == (tmp_path / "inf.csv").read_bytes()
    assert "from 2 checkpoint(s), with TTA" in capsys.readouterr().out
    assert inference.main(["--checkpoint", *map(str, members), "--no-tta", "--input", str(kaggle_dir),
                           "--output", str(tmp_path / "plain.csv")]) == 0
    assert "from 2 checkpoint(s)\n" in capsys.readouterr().out


def test_best_epoch_submits_the_best_validation_epoch_and_says_its_figure_is_optimistic(kaggle_dir, tmp_path,
                                                                                          capsys):
    ck = tmp_path / "ck"
    assert main.main(["--data", str(kaggle_dir), "--epochs", "4", "--best-epoch", "--widths", "4", "8", "8",
                      "--batch-size", "32", "--checkpoint-dir", str(ck), "--submission", str(tmp_path / "s.csv"),
                      "--report", ""]) == 0
    out = capsys.readouterr().out
    history = pd.read_csv(ck / "history.csv")
    best = load_checkpoint(str(ck / "best.pt"))
    assert best["val_accuracy"] == pytest.approx(history["val_accuracy"].max(), abs=1e-6)
    assert best["epoch"] == history["epoch"][history["val_accuracy"] >= history["val_accuracy"].max() - 1e-6].max()
    assert "* best" in out
    assert "(1 model(s), TTA) [optimistic: --best-epoch picked each model's epoch on these images]" in out


def test_tta_shift_views_are_one_pixel_rolls():
    x = torch.zeros(4, 1, 28, 28)
    x[:, :, 4:24, 4:24] = make_digits(4)[0][:, :, 4:24, 4:24].float() / 255  # nothing near the border
    assert inference.View(0, 1, 0) in inference.TTA_VIEWS and inference.View(0, 0, 1) in inference.TTA_VIEWS
    assert torch.allclose(warp(x, 0, 1, 0), torch.roll(x, -1, dims=3), atol=1e-5)  # +1 px in x: content moves left
    assert torch.allclose(warp(x, 0, -1, 0), torch.roll(x, 1, dims=3), atol=1e-5)
    assert torch.allclose(warp(x, 0, 0, 1), torch.roll(x, -1, dims=2), atol=1e-5)


def test_tta_and_ensemble_average_the_softmax_of_every_model_and_view():
    models = [DigitRecognizerModel(ModelConfig(widths=(4, 4, 4))).eval() for _ in range(2)]
    for model in models:
        model.classifier[-1].weight.data.mul_(100)  # confident outputs, so views and models differ
    images = make_digits(20)[0]
    x = images.float() / 255
    with torch.no_grad():
        expected = torch.stack([model(warp(x, *view)).softmax(1) for model in models
                                for view in inference.TTA_VIEWS]).mean(0)
        plain = torch.stack([model(x).softmax(1) for model in models]).mean(0)
    assert len(inference.TTA_VIEWS) == 7 and inference.TTA_VIEWS[0] == inference.View()
    assert torch.allclose(inference.predict_probs(models, images, torch.device("cpu"), tta=True), expected, atol=1e-5)
    assert torch.allclose(inference.predict_probs(models, images, torch.device("cpu")), plain, atol=1e-5)
    assert not torch.allclose(expected, plain, atol=1e-2)


def test_tta_follows_the_recipes_only_when_every_one_says_true_and_a_split_is_noted():
    notes = []
    recipes = lambda *settings: [{"identity": {"tta": tta}} for tta in settings]  # noqa: E731
    assert inference.trained_with_tta(recipes(True, True), notes.append) and notes == []
    assert not inference.trained_with_tta(recipes("no"), notes.append) and notes == []  # not a bool: not True
    assert not inference.trained_with_tta(recipes(True, False, True), notes.append)
    assert notes == ["note: 2 of these 3 checkpoints were submitted with TTA, the others without; predicting "
                     "without it (pass --tta to use it)"]


def test_full_train_uses_every_row_and_says_so(kaggle_dir, tmp_path, capsys):
    ck = tmp_path / "ck"
    assert main.main(["--data", str(kaggle_dir), "--epochs", "1", "--full-train", "--checkpoint-dir", str(ck),
                      "--submission", str(tmp_path / "s.csv")]) == 0
    out = capsys.readouterr().out
    assert "600 train / 0 validation" in out and "no validation split" in out
    assert "no validation images" in out and "nan" not in out  # the epoch line, not "val loss nan acc nan"
    assert "no report in reports/" in out and not (tmp_path / "reports").exists()
    assert load_checkpoint(str(ck / "best.pt"))["epoch"] == 1
    assert len(pd.read_csv(tmp_path / "s.csv")) == 120
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "index.html").write_text("<html>my own page</html>")
    report.write_unfinished_page(str(tmp_path / "reports" / "index.html"))  # a page of this suite's
    for folder, says in (("reports", "report on; the report there is an earlier run's\n"), ("mine", "report on\n")):
        assert main.main(["--data", str(kaggle_dir), "--epochs", "1", "--full-train", "--checkpoint-dir", str(ck),
                          "--submission", str(tmp_path / "s.csv"), "--widths", "4", "8", "8", "--report", folder]) == 0
        assert f"no report in {folder}: --full-train leaves no validation images to {says}" in capsys.readouterr().out


def test_presets_and_the_flags_that_override_them():
    best = main.parse_args(["--preset", "best"])[1]
    assert (best.ensemble.folds, best.ensemble.mix, best.ensemble.mix_epochs, best.ensemble.tta,
            best.train.epochs) == (5, "deotte", 15, True, 30)
    from ensemble import plan
    members = plan(best, make_digits(100)[1], "ck", seed=0)
    assert [(m.recipe.model.arch, m.recipe.train.epochs) for m in members] == [("cnn", 30), ("deotte", 15)] * 2 + [
        ("cnn", 30)]
    assert [m.seed for m in members] == [0, 1, 2, 3, 4]
    plain = main.parse_args(["--preset", "best", "--no-tta", "--folds", "3", "--mix", "none"])[1].ensemble
    assert (plain.folds, plain.mix, plain.tta) == (3, "none", False)
    fast = main.parse_args(["--preset", "fast"])[1]
    assert (fast.train.epochs, fast.ensemble.tta) == (3, False)
    assert main.parse_args(["--preset", "fast", "--epochs", "2"])[1].train.epochs == 2


def test_best_preset_with_one_model_turns_its_mix_off_and_says_so(kaggle_dir, tmp_path, capsys):
    ck = tmp_path / "ck"
    assert main.main(["--data", str(kaggle_dir), "--preset", "best", "--folds", "0", "--epochs", "1",
                      "--checkpoint-dir", str(ck), "--submission", str(tmp_path / "s.csv"), "--report", ""]) == 0
    assert "one model: --preset best's --mix deotte applies to ensembles only, so it is off" in capsys.readouterr().out
    state = load_checkpoint(str(ck / "best.pt"))
    assert state["model_config"]["arch"] == "cnn"
    assert (state["identity"]["mix"], state["identity"]["mix_epochs"]) == ("none", 0)  # the recipe that trained


def test_folds_beyond_the_rows_of_a_digit_are_refused_before_training(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    write_csv(data / "train.csv", *make_digits(60, seed=1))  # about 6 rows of each digit
    write_csv(data / "test.csv", make_digits(10, seed=2)[0])
    labels = np.bincount(pd.read_csv(data / "train.csv")["label"])
    folds = labels.min() + 1
    code = main.main(["--data", str(data), "--folds", str(folds), "--checkpoint-dir", str(tmp_path / "ck"),
                      "--submission", str(tmp_path / "s.csv")])
    err = capsys.readouterr().err
    assert code == 2 and f"--folds {folds} needs at least {folds} training rows of every digit, but one digit has " \
                          f"{labels.min()}; lower --folds" in err
    assert not (tmp_path / "ck").exists()


def test_arch_brings_its_own_widths_and_dropout_unless_they_are_given():
    deotte = main.parse_args(["--arch", "deotte"])[1].model
    assert (deotte.widths, deotte.dropout) == ((32, 64, 128), 0.4)
    given = main.parse_args(["--arch", "deotte", "--widths", "8", "16", "32", "--dropout", "0.2"])[1].model
    assert (given.widths, given.dropout) == ((8, 16, 32), 0.2)
    assert main.parse_args([])[1].model.widths == (16, 32, 128)


@pytest.mark.parametrize("argv, message", [
    (["--folds", "1"], "--folds K takes K >= 2"), (["--folds", "3", "--ensemble", "2"], "--folds K takes K >= 2"),
    (["--folds", "3", "--full-train"], "--folds K takes K >= 2"),
    (["--mix-epochs", "5"], "--mix-epochs 5 sets the epochs of the --mix members, but this run has none: add --mix"),
    (["--preset", "best", "--folds", "0", "--mix-epochs", "3"],  # one model: the preset's --mix is dropped
     "--mix-epochs 3 sets the epochs of the --mix members, but this run has none: add --folds K or --ensemble N"),
    (["--preset", "best", "--mix", "none", "--mix-epochs", "9"], "--mix-epochs 9 sets the epochs of the --mix"),
    (["--folds", "3", "--best-epoch"], "--best-epoch picks each model's epoch on its validation rows, but --folds "
                                       "scores those rows out of fold"),
    (["--full-train", "--best-epoch"], "--best-epoch picks each model's epoch on its validation rows, but "
                                       "--full-train leaves none: drop --best-epoch"),
    (["--mix", "deotte"], "--mix deotte makes every other member of an ensemble another architecture, but this run "
                          "trains one model"),
])
def test_ensembles_that_cannot_work_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main.parse_args(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_folds_predict_every_row_out_of_fold_with_two_architectures(kaggle_dir, tmp_path, capsys):
    ck = tmp_path / "ck"
    assert main.main(["--data", str(kaggle_dir), "--folds", "2", "--mix", "deotte", "--epochs", "2",
                      "--mix-epochs", "1", "--batch-size", "32", "--checkpoint-dir", str(ck),
                      "--submission", str(tmp_path / "s.csv"), "--report", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "out-of-fold accuracy (2 folds" in out and "member 2/2 (deotte, 1 epochs" in out
    states = [load_checkpoint(str(ck / f"member{k}" / "best.pt")) for k in (1, 2)]
    assert [s["model_config"]["arch"] for s in states] == ["cnn", "deotte"]
    # Each member's last epoch (not one picked on its held-out fold); --mix-epochs for the deotte one.
    assert [s["epoch"] for s in states] == [2, 1]
    assert [len(pd.read_csv(ck / f"member{k}" / "history.csv")) for k in (1, 2)] == [2, 1]
    per_class = pd.read_csv(tmp_path / "r" / "per_class_accuracy.csv")
    assert per_class["images"].sum() == 600  # every train.csv row, each predicted out of fold
    assert inference.main(["--checkpoint", *(str(ck / f"member{k}" / "best.pt") for k in (1, 2)), "--tta",
                           "--input", str(kaggle_dir), "--output", str(tmp_path / "inf.csv")]) == 0
    assert (tmp_path / "s.csv").read_bytes() == (tmp_path / "inf.csv").read_bytes()


def test_kfold_split_covers_every_row_once_and_keeps_digit_shares():
    from ensemble import kfold_split
    labels = make_digits(1000)[1]
    folds = kfold_split(labels, 5, seed=0)
    assert sorted(torch.cat(folds).tolist()) == list(range(1000))
    assert all(torch.bincount(labels[f], minlength=10).tolist() == [20] * 10 for f in folds)


def test_pseudo_label_run_names_the_round_2_checkpoints_that_rebuild_its_submission(kaggle_dir, tmp_path, capsys):
    ck, submission = tmp_path / "ck", tmp_path / "s.csv"
    assert main.main(["--data", str(kaggle_dir), "--pseudo-label", "0.1", "--epochs", "1", "--widths", "4", "8", "8",
                      "--checkpoint-dir", str(ck), "--submission", str(submission), "--report", ""]) == 0
    out = capsys.readouterr().out
    assert "join every member's training rows for round 2" in out
    command = shlex.split(out.split("the same file from the checkpoints alone: ")[1].splitlines()[0])
    assert command[:2] == ["python", os.path.join(os.path.dirname(os.path.abspath(main.__file__)), "inference.py")]
    assert command[2:4] == ["--checkpoint", str(ck / "round2" / "best.pt")]
    rebuilt = tmp_path / "rebuilt.csv"
    command[command.index("--output") + 1] = str(rebuilt)
    assert inference.main(command[2:]) == 0
    assert rebuilt.read_bytes() == submission.read_bytes()


def test_pseudo_label_under_folds_says_its_out_of_fold_figure_is_optimistic(kaggle_dir, tmp_path, capsys):
    assert main.main(["--data", str(kaggle_dir), "--pseudo-label", "0.1", "--folds", "2", "--epochs", "1",
                      "--widths", "4", "8", "8", "--checkpoint-dir", str(tmp_path / "ck"),
                      "--submission", str(tmp_path / "s.csv"), "--report", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert out.index("join every member's training rows for round 2") < out.index(
        "note: round 2's out-of-fold figure is slightly optimistic") < out.rindex("out-of-fold accuracy (2 folds")
    page = (tmp_path / "report" / "index.html").read_text()
    assert "slightly optimistic: its pseudo-labels come from round 1&#x27;s whole ensemble" in page


def test_a_pseudo_label_threshold_no_prediction_reaches_says_so(kaggle_dir, tmp_path, capsys):
    assert main.main(["--data", str(kaggle_dir), "--pseudo-label", "0.999", "--epochs", "1", "--widths", "4", "8", "8",
                      "--checkpoint-dir", str(tmp_path / "ck"), "--submission", str(tmp_path / "s.csv"),
                      "--report", ""]) == 0
    out = capsys.readouterr().out
    assert "pseudo-labels: 0 of 120 test images" in out
    assert re.search(r"note: the surest test prediction reads 0\.\d{3} .*use a lower --pseudo-label", out)


def test_pseudo_labels_keep_only_confident_test_images():
    from ensemble import pseudo_labelled
    images = make_digits(4)[0]
    probs = torch.tensor([[0.9] + [0.1 / 9] * 9, [0.5, 0.5] + [0.0] * 8, [0.0] * 9 + [1.0], [0.1] * 10])
    extra = pseudo_labelled(images, probs, threshold=0.85)
    assert extra.labels.tolist() == [0, 9] and torch.equal(extra.images, images[[0, 2]])


def test_ema_tracks_weights_with_its_decay():
    model = DigitRecognizerModel(ModelConfig(widths=(4, 4, 4)))
    ema = EMA(model, decay=0.75)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for old, new in zip(before, ema.model.parameters()):
        assert torch.allclose(new, old + 0.25)
