"""Behaviour of the suite end to end: data, augmentation, model, checkpoints, submission, CLI."""

import os

import pandas as pd
import pytest
import torch

import inference
import main
from DigitRecognizerModel import (ARCHITECTURES, DigitRecognizerModel, ModelConfig, build_model, load_checkpoint,
                                  model_from_checkpoint, save_checkpoint)
from conftest import make_digits, needs_real_data, real_csv_head, small_recipe
from dataloader import AugmentConfig, DigitDataset, augment, stratified_split, warp
from inference import predict_logits
from trainer import HISTORY_COLUMNS, MOMENTUM_DIP, BatchSource, Trainer, evaluate, train, train_step

CPU = torch.device("cpu")
NO_AUGMENT = AugmentConfig(rotate_deg=0, scale=0, shear=0, shift=0)


def test_stratified_split_is_seeded_disjoint_and_balanced():
    labels = make_digits(1000)[1]
    train_idx, val_idx = stratified_split(labels, 0.1, seed=3)
    assert len(val_idx) == 100 and len(train_idx) == 900
    assert not set(train_idx.tolist()) & set(val_idx.tolist())
    assert torch.bincount(labels[val_idx], minlength=10).tolist() == [10] * 10
    assert torch.equal(stratified_split(labels, 0.1, seed=3)[1], val_idx)
    assert not torch.equal(stratified_split(labels, 0.1, seed=4)[1], val_idx)


def test_augmentation_at_zero_strength_is_identity():
    x = make_digits(64)[0].float() / 255
    assert torch.equal(augment(x, NO_AUGMENT, torch.Generator().manual_seed(0)), x)
    # The warp itself is exact at zero: the same sampling grid the random path uses.
    assert torch.allclose(warp(x), x, atol=1e-5)


def brightness_coded_digits(n):
    """Flat images whose grey level encodes the label (30 + 20 * label): any warp keeps the centre's level."""
    labels = torch.arange(n) % 10
    images = (30 + 20 * labels).to(torch.uint8).view(n, 1, 1, 1).expand(n, 1, 28, 28).contiguous()
    return DigitDataset(images, labels)


@pytest.mark.parametrize("config", [NO_AUGMENT, AugmentConfig(), AugmentConfig(elastic_alpha=3.0)],
                         ids=["zero strength", "default", "default and elastic"])
def test_augmented_batches_keep_each_image_with_its_label(config):
    dataset = brightness_coded_digits(100)
    batches = BatchSource(dataset, 32, config, seed=1, device=CPU)
    seen = []
    for images, labels in batches.epoch(0):
        assert images.shape == (32, 1, 28, 28) and 0 <= images.min() and images.max() <= 1 + 1e-6
        centre_labels = ((images[:, 0, 14, 14] * 255 - 30) / 20).round().long()
        assert torch.equal(centre_labels, labels)
        seen += labels.tolist()
    assert len(seen) == 96 and seen != dataset.labels[:96].tolist()  # shuffled, and still paired
    if config.enabled:  # and really warped: the border is no longer flat
        assert not torch.equal(images[:, :, 0, :], images[:, :, 0, :1].expand(-1, -1, 28))


@pytest.mark.parametrize("alpha", [1.0, 3.0])
def test_elastic_moves_a_pixel_by_at_most_alpha_pixels(alpha):
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 14, 14] = 1
    elastic = AugmentConfig(rotate_deg=0, scale=0, shear=0, shift=0, elastic_alpha=alpha, elastic_sigma=4.0)
    warped = augment(x, elastic, torch.Generator().manual_seed(0))[:, 0]
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    lit = warped > 1e-6  # bilinear sampling lights the pixels whose source is within 1 px of (14, 14)
    distance = torch.maximum((rows - 14).abs(), (cols - 14).abs()).expand_as(lit)[lit]
    assert distance.max() < alpha + 1  # the field is at most alpha pixels in each direction
    mass = warped.sum((1, 2))
    centre = torch.stack([(warped * rows).sum((1, 2)), (warped * cols).sum((1, 2))], 1) / mass[:, None]
    assert (centre - 14).abs().max() > alpha / 2  # and it does move pixels, by a good part of alpha


def train_small(tmp_path, epochs=4, seed=0, augment_config=None):
    images, labels = make_digits(1200, seed=seed)
    full = DigitDataset(images, labels)
    train_idx, val_idx = stratified_split(labels, 0.2, seed)
    torch.manual_seed(seed)
    model = DigitRecognizerModel(ModelConfig(widths=(8, 16, 16)))
    recipe = small_recipe(epochs=epochs, batch_size=64, lr=0.05, widths=(8, 16, 16))
    history = train(model, full.subset(train_idx), full.subset(val_idx), recipe, CPU, str(tmp_path), seed=seed,
                    log=lambda *_: None)
    return model, full.subset(val_idx), history


def test_model_learns_synthetic_task_and_checkpoint_round_trips(tmp_path):
    model, val_set, history = train_small(tmp_path)
    assert len(history) == 4 and history[-1]["val_accuracy"] > 0.95
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["lr"] == pytest.approx(0.05 / 10 / 100)  # the one-cycle's last step: its lowest rate
    state = load_checkpoint(str(tmp_path / "best.pt"))
    restored = model_from_checkpoint(state)
    assert restored.config == model.config  # best.pt is the last epoch's model, unless --best-epoch
    assert (state["epoch"], state["val_accuracy"]) == (len(history), history[-1]["val_accuracy"])
    # last.pt holds the final weights: inference (BatchNorm folded) predicts the same.
    last, = inference.load_models([str(tmp_path / "last.pt")], CPU)
    expected = predict_logits(model, val_set.images, CPU)
    assert torch.allclose(predict_logits(last, val_set.images, CPU), expected, atol=1e-4)
    assert torch.equal(predict_logits(last, val_set.images, CPU).argmax(1), expected.argmax(1))
    assert evaluate(restored, val_set, CPU)["accuracy"] == state["val_accuracy"]


def test_checkpoint_holds_only_plain_types(tmp_path):
    model = DigitRecognizerModel(ModelConfig())
    save_checkpoint(str(tmp_path / "m.pt"), model, epoch=3)
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert state["model_config"] == {"arch": "cnn", "widths": (16, 32, 128), "dropout": 0.1, "num_classes": 10}
    assert state["epoch"] == 3 and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_dry_run_writes_nothing_and_leaves_a_real_run_alone(kaggle_dir, tmp_path, capsys):
    save_checkpoint(tmp_path / "earlier.pt", DigitRecognizerModel(ModelConfig(widths=(4, 8, 8))))
    real_run = {"ck/best.pt": (tmp_path / "earlier.pt").read_bytes(), "ck/last.pt": (tmp_path / "earlier.pt").read_bytes(),
                "ck/history.csv": (",".join(HISTORY_COLUMNS) + "\n").encode(),
                "final_submission.csv": b"ImageId,Label\n1,7\n",
                "reports/confusion_matrix.png": b"\x89PNG\r\n\x1a\n...Source\x00Digit Recognizer report"}
    for name, content in real_run.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(content)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert main.main(["--data", str(kaggle_dir), "--dry-run", "--checkpoint-dir", "ck", "--widths", "4", "8", "8",
                      "--epochs", "50"]) == 0
    out = capsys.readouterr().out
    assert "dry run: everything worked" in out
    assert "epoch   1/1 " in out and "epoch   2/" not in out  # one epoch of one batch, whatever --epochs says
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert all((tmp_path / name).read_bytes() == content for name, content in real_run.items())


@pytest.mark.parametrize("flags, says_report", [({}, True), ({"full_train": True}, False)])
def test_run_dry_run_returns_no_paths_of_removed_files(kaggle_dir, capsys, flags, says_report):
    results = main.run(data=str(kaggle_dir), dry_run=True, widths=[4, 8, 8], **flags)
    assert results["submission"] is None and results["checkpoints"] == [] and len(results["histories"]) == 1
    done = capsys.readouterr().out.splitlines()[-1]
    assert done.startswith("dry run: everything worked") and ("the report too" in done) == says_report


def test_dry_run_checks_all_rows_then_runs_on_a_stratified_sample(kaggle_dir, capsys, monkeypatch):
    monkeypatch.setattr(main, "DRY_RUN_ROWS", 100)
    assert main.main(["--data", str(kaggle_dir), "--dry-run", "--widths", "4", "8", "8", "--batch-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "dry run: 100 of 600 train.csv rows and 100 of 120 test images" in out
    assert "data: 90 train / 10 validation / 100 test images" in out and "(100 rows)" in out
    sample = main.dry_run_sample(main.DigitDataset(*make_digits(600, seed=1)), torch.zeros(120, 1, 28, 28),
                                 small_recipe(batch_size=16), log=lambda *_: None)[0]
    assert torch.bincount(sample.labels, minlength=10).tolist() == [10] * 10  # make_digits: 60 of each digit


@pytest.mark.parametrize("flags, says", [
    (["--submission", "{data}/test.csv"], "--submission {data}/test.csv: is an input of this run"),
    (["--submission", "/sys/x/y.csv"], "cannot write in /sys"),
])
def test_dry_run_refuses_what_the_real_run_would(kaggle_dir, tmp_path, capsys, flags, says):
    flags = [flag.format(data=kaggle_dir) for flag in flags]
    assert main.main(["--data", str(kaggle_dir), "--dry-run", "--checkpoint-dir", str(tmp_path / "ck"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says.format(data=kaggle_dir) in err[0]
    with pytest.raises(SystemExit):
        main.parse_args(["--dry-run", "--resume"])
    assert "nothing to --resume there" in capsys.readouterr().err


def test_a_dry_run_on_a_full_temporary_disk_says_to_set_tmpdir(kaggle_dir, capsys, monkeypatch):
    from files import OutputError

    def full(path, predictions):
        raise OutputError(f"{path}: cannot write: the disk is full; free space or choose another location")
    monkeypatch.setattr(main, "write_submission", full)
    assert main.main(["--data", str(kaggle_dir), "--dry-run", "--epochs", "1", "--report", ""]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "digit-dry-run-" in err[0] and "set TMPDIR to another folder" in err[0]


@pytest.mark.parametrize("held, flags, says", [
    ("ck", [], "--checkpoint-dir {ck}: in use by another run (pid "),
    ("ck/member1", [], "--checkpoint-dir {ck}: in use by another run (a run in a folder inside it)"),
    ("rep", ["--report", "{tmp}/rep"], "--report {tmp}/rep: in use by another run (pid "),
])
def test_dry_run_refuses_folders_another_run_holds_and_makes_none(kaggle_dir, tmp_path, capsys, held, flags, says):
    from files import folder_lock
    with folder_lock(str(tmp_path / held)):
        folders = sorted(tmp_path.rglob("*"))
        argv = ["--data", str(kaggle_dir), "--dry-run", "--checkpoint-dir", str(tmp_path / "ck"),
                *[flag.format(tmp=tmp_path) for flag in flags]]
        assert main.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says.format(ck=tmp_path / "ck", tmp=tmp_path) in err[0], err
        assert sorted(tmp_path.rglob("*")) == folders


def test_resume_of_an_ensemble_without_its_flags_says_which_flags(kaggle_dir, tmp_path, capsys):
    (tmp_path / "ck" / "member1").mkdir(parents=True)
    (tmp_path / "ck" / "member1" / "last.pt").write_bytes(b"an interrupted member")
    assert main.main(["--data", str(kaggle_dir), "--resume", "--checkpoint-dir", str(tmp_path / "ck"),
                      "--submission", str(tmp_path / "s.csv")]) == 2
    assert f"ck/last.pt: nothing to resume (no such file); but {tmp_path}/ck/member1/last.pt is: resume with the " \
           f"--ensemble and --folds of the run that wrote it" in capsys.readouterr().err


def test_run_from_python_with_report_false_writes_no_report(kaggle_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main.run(data=str(kaggle_dir), epochs=1, widths=(4, 8, 8), report=False, quiet=True)
    assert os.path.exists("final_submission.csv") and not os.path.exists("reports")


def check_submission(path, rows):
    table = pd.read_csv(path)
    assert list(table.columns) == ["ImageId", "Label"]
    assert table["ImageId"].tolist() == list(range(1, rows + 1))
    assert table["Label"].between(0, 9).all() and table["Label"].dtype.kind == "i"
    return table


@needs_real_data
def test_main_on_a_slice_of_the_real_data(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.csv").write_bytes(real_csv_head("train.csv", 1000))
    (data / "test.csv").write_bytes(real_csv_head("test.csv", 300))
    submission = tmp_path / "sub.csv"
    assert main.main(["--data", str(data), "--epochs", "1", "--batch-size", "64", "--checkpoint-dir",
                      str(tmp_path / "ck"), "--submission", str(submission), "--report", ""]) == 0
    check_submission(submission, rows=300)


@pytest.mark.parametrize("argv, message", [
    (["--no-such-flag"], "unrecognized arguments"),
    (["--epochs", "zero"], "--epochs: 'zero' is not an integer"),
    (["--epochs", "0"], "--epochs: 0 is out of range; it must be in [1, 1000]"),
    (["--lr", "nan"], "--lr: nan is out of range"),
    (["--lr", "inf"], "--lr: inf is out of range"),
    (["--lr", "-0.1"], "--lr: -0.1 is out of range"),
    (["--elastic", "inf"], "--elastic: inf is out of range"),
    (["--elastic", "nan"], "--elastic: nan is out of range"),
    (["--ema", "1"], "--ema: 1 is out of range; it must be in [0, 1)"),
    (["--momentum", "0"], "--momentum: 0 is out of range; it must be in [0.1, 1)"),  # Nesterov needs momentum
    (["--widths", "100000", "100000", "100000"], "--widths: 100000 is out of range"),
    (["--widths", "8", "16"], "argument --widths: expected 3 arguments"),
    (["--label-smoothing", "1.5"], "--label-smoothing: 1.5 is out of range"),
    (["--seed", "100000000000000000"], "--seed: 100000000000000000 is out of range; it must be in [0, 2147483647]"),
    (["--batch-size", "1"], "--batch-size: 1 is out of range"),  # BatchNorm needs 2 images
])
def test_main_cli_errors_exit_2_with_one_line(argv, message, tmp_path, capsys):
    code = exit_code(main.main, argv + ["--checkpoint-dir", str(tmp_path / "ck"), "--submission", str(tmp_path / "s.csv")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "ck").exists()


def exit_code(entry_point, argv):
    """The exit code of a CLI entry point, whether it returns it or argparse exits."""
    try:
        return entry_point(argv)
    except SystemExit as e:
        return e.code


def test_inference_missing_checkpoint_exits_2(kaggle_dir, tmp_path, capsys):
    code = inference.main(["--checkpoint", str(tmp_path / "nope.pt"), "--input", str(kaggle_dir),
                           "--output", str(tmp_path / "s.csv")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "nope.pt" in err and len(err.splitlines()) == 1 and not (tmp_path / "s.csv").exists()


def test_inference_report_needs_a_folder(kaggle_dir, tmp_path, capsys):
    """In main.py --report '' means no report; here it would have written into the current folder."""
    code = exit_code(inference.main, ["--checkpoint", "ck.pt", "--input", str(kaggle_dir / "train.csv"), "--report", ""])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--report '' names no folder" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "index.html").exists() and not (tmp_path / "per_class_accuracy.csv").exists()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_folding_batchnorm_leaves_none_and_predicts_the_same(arch):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, widths=(4, 8, 16))).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):  # statistics that folding must carry over
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    images = make_digits(16)[0].float() / 255
    with torch.no_grad():
        before = model(images)
        after = model.fuse_batchnorm_()(images)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("native", [True, False])
def test_training_steps_in_bf16_only_where_the_cpu_has_it_and_prediction_stays_float32(native, monkeypatch):
    """bf16 trains 1.5x as fast on a CPU with AVX512_BF16 and slower than float32 on one
    without; predictions stay float32 on any CPU, so a checkpoint predicts the same everywhere."""
    monkeypatch.setattr(inference, "computes_bf16", lambda device: native)
    model = DigitRecognizerModel(ModelConfig(widths=(4, 8, 8))).to(memory_format=torch.channels_last)
    seen = []
    model.features[0].register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    images, labels = make_digits(8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    before = model.features[0].weight.detach().clone()
    loss, _ = train_step(model, optimizer, images.float() / 255, labels, 0.1, CPU)
    assert seen == [torch.bfloat16 if native else torch.float32]
    assert loss.dtype == torch.float32 and not torch.equal(model.features[0].weight, before)
    assert model.features[0].weight.dtype == torch.float32  # autocast: the weights themselves stay float32
    predict_logits(model, images, CPU)
    assert seen[1:] == [torch.float32]
    assert inference.uses_bf16(torch.device("cuda"), training=False) == native  # a GPU predicts in bf16 too


@pytest.mark.parametrize("capability, native", [((7, 5), False), ((6, 0), False), ((8, 0), True), ((9, 0), True)])
def test_only_gpus_from_ampere_on_compute_in_bf16(capability, native, monkeypatch):
    """A Kaggle T4 (7.5) or P100 (6.0) would emulate bf16, slower than float32."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: asked.append(device) or capability)
    gpu = torch.device("cuda", 1)
    assert inference.computes_bf16.__wrapped__(gpu) == native and asked == [gpu]  # uncached; this GPU, not GPU 0


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads the CPU's flags from /proc/cpuinfo")
def test_the_bf16_check_agrees_with_the_cpus_own_flags():
    """The other bf16 tests replace computes_bf16: this one checks the real check, so a typo in
    it cannot quietly keep every AVX512_BF16 machine in float32."""
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    assert inference.computes_bf16.__wrapped__(CPU) == ("avx512_bf16" in flags)


def test_the_log_says_what_training_computes_in(kaggle_dir, monkeypatch, capsys):
    for native, says in [(True, "device cpu (training in bf16)"), (False, "device cpu (training in float32)")]:
        monkeypatch.setattr(inference, "computes_bf16", lambda device: native)
        main.main(["--data", str(kaggle_dir), "--epochs", "1", "--widths", "4", "8", "8", "--dry-run", "--device", "cpu"])
        assert says in capsys.readouterr().out


def test_momentum_is_the_peak_of_the_one_cycle_momentum_schedule(tmp_path):
    """OneCycleLR cycles the momentum too: --momentum must set that cycle, or it would do nothing."""
    images, labels = make_digits(200)
    data = DigitDataset(images, labels)
    for momentum in (0.5, 0.95):
        recipe = small_recipe(epochs=2, batch_size=32, momentum=momentum, widths=(4, 8, 8))
        trainer = Trainer(DigitRecognizerModel(ModelConfig(widths=(4, 8, 8))), data.subset(torch.arange(160)),
                          data.subset(torch.arange(160, 200)), recipe, CPU, str(tmp_path), log=lambda *_: None)
        seen = []
        for _ in range(trainer.batches.steps * 2 - 1):
            seen.append(trainer.optimizer.param_groups[0]["momentum"])
            trainer.optimizer.step()
            trainer.scheduler.step()
        assert max(seen) == pytest.approx(momentum) and min(seen) == pytest.approx(momentum - MOMENTUM_DIP)


def test_training_whose_warmup_is_exactly_one_step_runs(tmp_path):
    """5 steps at --warmup 0.2: torch's OneCycleLR divided by zero here."""
    images, labels = make_digits(200)
    data = DigitDataset(images, labels)
    recipe = small_recipe(epochs=1, batch_size=32, warmup=0.2, widths=(4, 8, 8))
    history = train(DigitRecognizerModel(ModelConfig(widths=(4, 8, 8))), data.subset(torch.arange(160)),
                    data.subset(torch.arange(160, 200)), recipe, CPU, str(tmp_path), log=lambda *_: None)
    assert len(history) == 1


def test_run_takes_false_for_every_on_off_flag(monkeypatch):
    seen = {}
    monkeypatch.setattr(main, "_run", lambda options, recipe, log: seen.update(options=options, recipe=recipe))
    main.run(resume=False, quiet=False, dry_run=False, tta=False, full_train=True)
    assert not (seen["options"].resume or seen["options"].quiet or seen["options"].dry_run)
    assert (seen["recipe"].ensemble.tta, seen["recipe"].ensemble.full_train) == (False, True)
    main.run(resume=True, tta=True)
    assert seen["options"].resume and seen["recipe"].ensemble.tta
    main.run(rotate=5, elastic=2)  # flags whose settings have other names (rotate_deg, elastic_alpha)
    assert (seen["recipe"].augment.rotate_deg, seen["recipe"].augment.elastic_alpha) == (5, 2)
    main.run(submission="-x.csv", checkpoint_dir="-ck")  # values that start like a flag
    assert (seen["options"].submission, seen["options"].checkpoint_dir) == ("-x.csv", "-ck")


def test_resuming_a_last_pt_from_an_older_version_names_the_setting_it_lacks():
    from trainer import check_resumable
    from DigitRecognizerModel import CheckpointError
    state = {"optimizer": {}, "identity": {"epochs": 30, "seed": 0}}
    with pytest.raises(CheckpointError, match=r"ck/last.pt: was trained on another recipe or data \(it records no "
                                              r"--mix-epochs: written by an older version of this suite\)"):
        check_resumable(state, "ck/last.pt", {"epochs": 30, "seed": 0, "mix_epochs": 0}, {"mix_epochs": "--mix-epochs"})
    with pytest.raises(CheckpointError, match=r"\(--epochs 30, not --epochs 4\)"):
        check_resumable(state, "ck/last.pt", {"epochs": 4, "seed": 0}, {"epochs": "--epochs"})
