"""Ensembles, test-time augmentation and full-data refits, on tiny synthetic data."""

import pandas as pd
import torch

import inference
import main
from DigitRecognizerModel import DigitRecognizerModel, ModelConfig, load_checkpoint
from conftest import make_digits
from dataloader import warp
from trainer import EMA


def test_ensemble_with_tta_matches_inference_on_the_same_checkpoints(kaggle_dir, tmp_path, capsys):
    ck = tmp_path / "ck"
    argv = ["--data", str(kaggle_dir), "--epochs", "2", "--ensemble", "2", "--tta", "--widths", "8", "16", "16",
            "--checkpoint-dir", str(ck), "--submission", str(tmp_path / "main.csv")]
    assert main.main(argv) == 0
    members = [ck / "member1" / "best.pt", ck / "member2" / "best.pt"]
    seeds = [load_checkpoint(str(path))["identity"]["seed"] for path in members]
    assert seeds == [0, 1]
    assert "validation accuracy of the submitted predictor (2 model(s), TTA)" in capsys.readouterr().out
    assert inference.main(["--checkpoint", *map(str, members), "--tta", "--input", str(kaggle_dir),
                           "--output", str(tmp_path / "inf.csv")]) == 0
    assert (tmp_path / "main.csv").read_bytes() == (tmp_path / "inf.csv").read_bytes()


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


def test_full_train_uses_every_row_and_says_so(kaggle_dir, tmp_path, capsys):
    ck = tmp_path / "ck"
    assert main.main(["--data", str(kaggle_dir), "--epochs", "1", "--full-train", "--checkpoint-dir", str(ck),
                      "--submission", str(tmp_path / "s.csv")]) == 0
    out = capsys.readouterr().out
    assert "600 train / 0 validation" in out and "no validation split" in out
    assert "no report in reports/" in out and not (tmp_path / "reports").exists()
    assert load_checkpoint(str(ck / "best.pt"))["epoch"] == 1
    assert len(pd.read_csv(tmp_path / "s.csv")) == 120


def test_best_preset_has_tta_that_a_flag_turns_off():
    best = main.parse_args(["--preset", "best"])[1].ensemble
    assert (best.ensemble, best.tta, best.full_train) == (5, True, False)
    plain = main.parse_args(["--preset", "best", "--no-tta", "--full-train"])[1].ensemble
    assert (plain.ensemble, plain.tta, plain.full_train) == (5, False, True)
    default = main.parse_args(["--tta"])[1].ensemble
    assert (default.ensemble, default.tta, default.full_train) == (1, True, False)


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
