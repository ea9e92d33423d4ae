"""Train a CNN on Kaggle's Digit Recognizer data and write final_submission.csv.

Usage:
    pip install -r requirements.txt
    python main.py                                          # data/ (CSVs or the zip), else the Kaggle input
    python main.py --data ../shared/data/digit-recognizer.zip
    python main.py --preset fast                            # about a minute on 2 CPU cores
    python main.py --preset best                            # the leaderboard recipe (see the README)
    python main.py --resume                                 # continue checkpoints/last.pt, same flags
    python main.py --dry-run                                # one batch of everything, writes nothing
    torchrun --nproc_per_node=2 main.py ...                 # data-parallel; see the README
    python main.py --quiet --report ''                      # no bars, no per-epoch lines, no report

From Python (a notebook cell): `from main import run; results = run(preset="fast", epochs=3)`
takes the flags as keyword arguments, returns the results and raises on bad input.

After training, reports/ holds learning curves, the validation confusion matrix, the
most confident mistakes, augmented samples and per_class_accuracy.csv for the submitted
predictor (not under --full-train, which leaves no validation split).
Then submit: kaggle competitions submit -c digit-recognizer -f final_submission.csv -m "..."
"""

import contextlib
import os
import shlex
import shutil
import sys
import tempfile
import time

import torch

from DigitRecognizerModel import build_model
from cli import (ArgumentParser, UserError, add_setting_flags, choose_device, fail,
                 flatten_settings, settings_from_flags, sigterm_as_interrupt)
from dataloader import DataError, DigitDataset, check_training_set, find_data, load_test, load_train, stratified_split
from files import check_outputs, folder_lock
from inference import csv_files, load_models, predict_probs, write_submission
from recipe import PRESETS, VAL_FRACTION, Recipe, preset, preset_notes
from report import report_files, write_report
from trainer import TrainingDiverged, close_distributed, init_distributed, rank_and_world_size, train

CHECKPOINT_FILES = ("best.pt", "last.pt", "history.csv")


class _RaisingParser(ArgumentParser):
    """For `run(**kwargs)`: a bad setting raises UserError instead of exiting."""

    def error(self, message):
        raise UserError(message)


def build_parser(parser_class=ArgumentParser):
    parser = parser_class(description="Train the digit recognizer and write a Kaggle submission.")
    parser.add_argument("--data", default=None,
                        help="folder with train.csv and test.csv, or the Kaggle zip (default: the first of data/, "
                             "data/digit-recognizer.zip and /kaggle/input/digit-recognizer/ that holds them; "
                             "$DIGIT_RECOGNIZER_KAGGLE_INPUT replaces /kaggle/input)")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS),
                        help="recipe: fast = a minute's look, default = one model, best = the leaderboard "
                             "ensemble; flags below override its settings (default: default)")
    parser.add_argument("--seed", type=int, default=0, help="seed for split, init, shuffle and augmentation (default: 0)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto = cuda when available, else cpu (default: auto)")
    parser.add_argument("--checkpoint-dir", default="checkpoints", help="where best.pt and last.pt go (default: checkpoints)")
    parser.add_argument("--submission", default="final_submission.csv", help="submission path (default: final_submission.csv)")
    parser.add_argument("--resume", action="store_true", help="continue from <checkpoint-dir>/last.pt (default: off)")
    parser.add_argument("--dry-run", action="store_true",
                        help="one batch of training and validation, one epoch, outputs in a temporary folder "
                             "that is removed: a smoke test that writes nothing (default: off)")
    parser.add_argument("--report", default="reports/", metavar="DIR",
                        help="after training, write plots and per_class_accuracy.csv for the submitted predictor "
                             "on the validation split here; '' = no report (default: reports/)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars and no per-epoch lines; bars are also off whenever stderr "
                             "is not a terminal (default: off)")
    add_setting_flags(parser.add_argument_group("recipe (defaults of the default preset)"), Recipe(),
                      preset_notes())
    return parser


def parse_args(argv, parser_class=ArgumentParser):
    """(options, recipe): the run's options and the preset's recipe with the given flags applied."""
    parser = build_parser(parser_class)
    options = parser.parse_args(argv)
    recipe = settings_from_flags(options, preset(options.preset))
    world_size = int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun
    if recipe.train.batch_size % world_size:
        parser.error(f"--batch-size {recipe.train.batch_size} is the global batch; it must divide evenly "
                     f"over the {world_size} processes")
    if len(recipe.model.widths) != 3 and recipe.model.arch == "cnn":
        parser.error(f"--widths takes 3 numbers for --arch cnn, got {len(recipe.model.widths)}")
    return options, recipe


def member_dirs(options, recipe):
    """Checkpoint folder of each ensemble member: the folder itself for a single model."""
    if recipe.ensemble.ensemble == 1:
        return [options.checkpoint_dir]
    return [os.path.join(options.checkpoint_dir, f"member{m + 1}") for m in range(recipe.ensemble.ensemble)]


def planned_outputs(options, recipe):
    """[(flag, path)] of every file the run will write, for the checks before it starts."""
    outputs = [("--submission", options.submission)]
    outputs += [("--report", path) for path in report_files(options.report)] if options.report else []
    outputs += [("--checkpoint-dir", os.path.join(folder, name))
                for folder in member_dirs(options, recipe) for name in CHECKPOINT_FILES]
    return outputs


def load_data(options, recipe, log):
    """(train set, validation set, test images), checked before any training."""
    images, labels = load_train(options.data, log=log)
    test_images = load_test(options.data, log=log)  # read (and checked) before training, not after
    val_fraction = 0 if recipe.ensemble.full_train else VAL_FRACTION
    check_training_set(options.data, labels, val_fraction, log=log)
    full = DigitDataset(images, labels)
    train_idx, val_idx = stratified_split(labels, val_fraction, options.seed)
    if len(train_idx) < recipe.train.batch_size:
        raise DataError(f"--batch-size {recipe.train.batch_size} is larger than the {len(train_idx):,} training "
                        f"images; lower it or add data")
    return full.subset(train_idx), full.subset(val_idx), test_images


def train_members(options, recipe, train_set, val_set, device, log):
    """Train every ensemble member; returns (histories, best.pt paths)."""
    histories, checkpoints = [], []
    for member, folder in enumerate(member_dirs(options, recipe)):
        seed = options.seed + member
        if recipe.ensemble.ensemble > 1:
            log(f"ensemble member {member + 1}/{recipe.ensemble.ensemble} (seed {seed}) -> {folder}")
        torch.manual_seed(seed)
        model = build_model(recipe.model)
        # A resumed ensemble continues the member that was cut off and starts the ones never begun.
        resume = options.resume and (member == 0 or os.path.exists(os.path.join(folder, "last.pt")))
        # progress=None: bars only when stderr is a terminal; --quiet also drops the per-epoch lines.
        histories.append(train(model, train_set, val_set, recipe, device, folder, seed=seed, resume=resume,
                               max_steps_per_epoch=1 if options.dry_run else 0,
                               log=(lambda message: None) if options.quiet else log,
                               progress=False if options.quiet else None))
        checkpoints.append(os.path.join(folder, "best.pt"))
    return histories, checkpoints


def submit(options, recipe, checkpoints, val_set, test_images, device, log):
    """Write the submission from the members' best.pt; returns the validation accuracy of the
    submitted predictor (ensemble, TTA) and its validation and test probabilities."""
    models = load_models(checkpoints, device)
    tta = recipe.ensemble.tta
    val_probs = predict_probs(models, val_set.images, device, tta=tta)  # (0, 10) under --full-train
    val_accuracy = float("nan")
    if len(val_set):
        val_accuracy = (val_probs.argmax(1) == val_set.labels).float().mean().item()
        log(f"validation accuracy of the submitted predictor ({len(models)} model(s){', TTA' if tta else ''}): "
            f"{val_accuracy:.4f}")
    test_probs = predict_probs(models, test_images, device, tta=tta)
    write_submission(options.submission, test_probs.argmax(1))
    return val_accuracy, val_probs, test_probs


def write_run_report(options, recipe, histories, sets, probabilities, seconds, log):
    """reports/ for the submitted predictor: validation errors, test-set confidence, the recipe."""
    train_set, val_set, test_images = sets
    val_probs, test_probs = probabilities
    if not len(val_set):
        log(f"no report in {options.report}: --full-train leaves no validation images to report on")
        return
    settings = {"preset": options.preset, "seed": options.seed, "data": options.data,
                **{key: ", ".join(map(str, v)) if isinstance(v, tuple) else v
                   for key, v in flatten_settings(recipe).items()}}
    write_report(options.report, val_set, val_probs, history=histories[-1], augment_config=recipe.augment,
                 train_set=train_set, log=log, line_numbers=val_set.line_numbers, test_images=test_images,
                 test_probabilities=test_probs, recipe=settings,
                 summary={"models": len(histories), "seconds to train and predict": round(seconds)})


def train_and_submit(options, recipe, device, log=print):
    """Train, then write the submission and the report on the validation split.

    Returns {'histories', 'val_accuracy', 'checkpoints', 'submission', 'seconds'}, where
    val_accuracy is that of the submitted predictor (ensemble, TTA) on the validation split.
    """
    started = time.perf_counter()
    device = init_distributed(device)
    rank, world_size = rank_and_world_size()
    if rank:  # rank 0 alone logs and writes files
        log = lambda *_, **__: None
    options.data = find_data(options.data)  # data/, the Kaggle CLI's zip, or a notebook's input folder
    inputs = csv_files(options.data, "train.csv") + csv_files(options.data, "test.csv")
    check_outputs(planned_outputs(options, recipe), inputs)
    train_set, val_set, test_images = load_data(options, recipe, log)
    processes = f" in each of {world_size} processes" if world_size > 1 else ""
    log(f"data: {len(train_set):,} train / {len(val_set):,} validation / {len(test_images):,} test images; "
        f"device {device}, {torch.get_num_threads()} threads{processes}")
    if recipe.ensemble.full_train:
        log(f"full-train: no validation split; the model after epoch {recipe.train.epochs} is the one submitted")
    with folder_lock(options.checkpoint_dir) if rank == 0 else contextlib.nullcontext():
        histories, checkpoints = train_members(options, recipe, train_set, val_set, device, log)
        val_accuracy = float("nan")
        if rank == 0:  # every rank ends with the same weights; one writes
            val_accuracy, *probabilities = submit(options, recipe, checkpoints, val_set, test_images, device, log)
            if options.report:
                write_run_report(options, recipe, histories, (train_set, val_set, test_images), probabilities,
                                 time.perf_counter() - started, log)
    seconds = time.perf_counter() - started
    log(f"wrote {options.submission} ({len(test_images):,} rows) in {seconds:.0f}s")
    return {"histories": histories, "val_accuracy": val_accuracy, "checkpoints": checkpoints,
            "submission": options.submission, "seconds": seconds, "recipe": recipe}


@contextlib.contextmanager
def dry_run_outputs(options, log):
    """Under --dry-run, every output goes to a temporary folder, removed afterwards, so a smoke
    test never touches a real run's checkpoints, report or submission."""
    if not options.dry_run:
        yield
        return
    folder = tempfile.mkdtemp(prefix="digit-dry-run-")
    options.checkpoint_dir = os.path.join(folder, "checkpoints")
    options.submission = os.path.join(folder, "final_submission.csv")
    options.report = os.path.join(folder, "reports") if options.report else ""
    try:
        yield
        log("dry run: everything worked; its outputs were temporary and are removed, nothing else was written")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run(options, recipe, log):
    device = choose_device(options.device)  # chosen once, here
    with dry_run_outputs(options, log):
        return train_and_submit(options, recipe, device, log)


def run(log=print, **flags):
    """Train and write the submission from Python: the command line's flags as keyword
    arguments (`run(data="data/", preset="fast", epochs=3, tta=True)`).

    Returns the results dict of `train_and_submit`; bad input raises UserError (a
    DataError, CheckpointError or OutputError), a diverged run TrainingDiverged.
    """
    argv = []
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{name.replace('_', '-')}")
        else:
            argv += [flag, *map(str, value if isinstance(value, (list, tuple)) else [value])]
    options, recipe = parse_args(argv, _RaisingParser)
    return _run(options, recipe, log)


def main(argv=None) -> int:
    options, recipe = parse_args(argv)
    try:
        with sigterm_as_interrupt():  # SIGTERM stops like Ctrl-C: last.pt holds the last whole epoch
            _run(options, recipe, print)
            close_distributed(wait_for_peers=True)
    except UserError as e:
        return fail(e)
    except TrainingDiverged as e:
        return fail(e, code=1)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # one message, not one per torchrun process
            print_resume_hint(argv, options, recipe)
        return 130
    finally:
        close_distributed()
    return 0


def print_resume_hint(argv, options, recipe):
    flags = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--resume"]
    command = "torchrun <same options> main.py" if "WORLD_SIZE" in os.environ else "python main.py"
    if options.dry_run or not os.path.exists(os.path.join(member_dirs(options, recipe)[0], "last.pt")):
        print("\ninterrupted before the first checkpoint; start again with the same command", file=sys.stderr)
    else:
        print(f"\ninterrupted; resume with: {command} --resume {shlex.join(flags)}".rstrip(), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
