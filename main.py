"""Train a CNN on Kaggle's Digit Recognizer data and write final_submission.csv.

Usage:
    pip install -r requirements.txt
    python main.py                                          # data/ (CSVs or the zip), else the Kaggle input
    python main.py --data ../shared/data/digit-recognizer.zip
    python main.py --preset fast                            # under a minute on 2 CPU cores
    python main.py --preset best                            # the leaderboard recipe (see the README)
    python main.py --resume                                 # continue checkpoints/last.pt, same flags
    python main.py --dry-run                                # every step on 1,000 rows, writes nothing
    torchrun --nproc_per_node=2 main.py ...                 # data-parallel; see the README
    python main.py --quiet --report ''                      # no bars, no per-epoch lines, no report

From Python (a notebook cell): `from main import run; results = run(preset="fast", epochs=3)`
takes the flags as keyword arguments, returns the results and raises on bad input.

After training, reports/index.html shows the run on one page: learning curves, the
confusion matrix, per-class accuracy, every mistake with its train.csv line, the test
set's least confident images and the recipe (not under --full-train, which leaves no
validation split).
Then submit: kaggle competitions submit -c digit-recognizer -f final_submission.csv -m "..."
"""

import contextlib
import os
import shutil
import sys
import tempfile
import time

import torch

from DigitRecognizerModel import CHECKPOINT, NUM_CLASSES, CheckpointError, build_model, own_defaults
from cli import (ArgumentParser, LogError, UserError, add_setting_flags, choose_device, flatten_settings,
                 launched_world_size, path_argument, prepare_output, ranged, replace_settings, run_command,
                 settings_from_flags, shell_word)
from dataloader import (DataError, DigitDataset, check_training_set, find_data, load_test, load_train,
                        names_read_as_data, source_files, stratified_split)
from ensemble import (existing_member_folders, member_count, member_folders, out_of_fold_probs, plan, pseudo_labelled,
                      stale_member_folders, with_extra)
from files import HOLDER, HOLDER_FILE, OutputError, check_outputs, check_unlocked, folder_lock, read_head
from inference import SUBMISSION, load_models, predict_probs, training_precision, write_submission
from recipe import PRESETS, VAL_FRACTION, Recipe, flag_notes, preset
from report import holds_a_report, report_files, write_report
from trainer import (HISTORY, TrainingDiverged, close_distributed, drop_traceback_locals, init_distributed,
                     rank_and_world_size, share_from_rank_0, train, wait_for_peers)

CHECKPOINT_FILES = {"best.pt": CHECKPOINT, "last.pt": CHECKPOINT, "history.csv": HISTORY}  # in each member's folder
DRY_RUN_ROWS = 1000  # train.csv rows (at least) and test.csv rows a dry run trains and predicts on


class _RaisingParser(ArgumentParser):
    """For `run(**kwargs)`: a bad setting raises UserError instead of exiting."""

    def error(self, message):
        raise UserError(message)


def build_parser(parser_class=ArgumentParser):
    parser = parser_class(description="Train the digit recognizer and write a Kaggle submission.")
    parser.add_argument("--data", default=None, type=path_argument,
                        help="folder with train.csv and test.csv, or the Kaggle zip (default: the first of data/, "
                             "data/digit-recognizer.zip and /kaggle/input/digit-recognizer/ that holds them; "
                             "$DIGIT_RECOGNIZER_KAGGLE_INPUT replaces /kaggle/input)")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS),
                        help="recipe: fast = a minute's look, default = one model, best = the leaderboard "
                             "ensemble; flags below override its settings (default: default)")
    parser.add_argument("--seed", type=ranged(int, 0, 2**31 - 1), default=0,
                        help="seed for split, init, shuffle and augmentation, 0 to 2^31-1 (default: 0)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto = cuda when available, else cpu (default: auto)")
    parser.add_argument("--checkpoint-dir", default="checkpoints", help="where best.pt and last.pt go (default: checkpoints)")
    parser.add_argument("--submission", default="final_submission.csv", help="submission path (default: final_submission.csv)")
    parser.add_argument("--resume", action="store_true", help="continue from <checkpoint-dir>/last.pt (default: off)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check all the data, then run every step on a stratified sample of about 1,000 of "
                             "its rows (more for batches over 250; one epoch of one batch per model) with outputs "
                             "in a temporary folder that is removed: a smoke test that writes nothing (default: off)")
    parser.add_argument("--report", default="reports/", metavar="DIR",
                        help="after training, write plots and per_class_accuracy.csv for the submitted predictor "
                             "on the validation split (every row, out of fold, under --folds) here; none under "
                             "--full-train; '' = no report (default: reports/)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars and no per-epoch lines; bars are also off whenever stderr "
                             "is not a terminal (default: off)")
    add_setting_flags(parser.add_argument_group("recipe (defaults of the default preset)"), Recipe(),
                      flag_notes())
    return parser


def parse_args(argv, parser_class=ArgumentParser):
    """(options, recipe): the run's options and the preset's recipe with the given flags applied."""
    parser = build_parser(parser_class)
    options = parser.parse_args(argv)
    recipe = settings_from_flags(options, preset(options.preset))
    if options.arch is not None:  # --arch deotte: deotte's own widths and dropout, unless given too
        own = {name: value for name, value in own_defaults(recipe.model.arch).items() if getattr(options, name) is None}
        recipe = replace_settings(recipe, own)
    try:
        refuse_impossible(options, recipe)
    except UserError as e:
        parser.error(str(e))
    # 'x/../ck' is ck and makes no x; but through a link, 'link/../ck' is beside the link's target
    shortest = os.path.normpath(options.checkpoint_dir)
    if os.path.realpath(shortest) == os.path.realpath(options.checkpoint_dir):
        options.checkpoint_dir = shortest
    if member_count(recipe) == 1 and recipe.ensemble.mix != "none":  # a preset's --mix, e.g. best --folds 0
        recipe = replace_settings(recipe, {"mix": "none", "mix_epochs": 0})  # the checkpoints say what trained
    if options.dry_run:  # one epoch of one batch per member
        recipe = replace_settings(recipe, {"epochs": 1, "mix_epochs": 0})
    return options, recipe


def refuse_impossible(options, recipe):
    """UserError for flags that cannot go together, or that this run would silently ignore."""
    world_size = launched_world_size()
    if recipe.train.batch_size % world_size or recipe.train.batch_size < 2 * world_size:
        raise UserError(f"--batch-size {recipe.train.batch_size} is the global batch; it must divide evenly "
                        f"over the {world_size} process(es), at least 2 images each (BatchNorm needs 2)")
    if not options.checkpoint_dir:
        raise UserError("--checkpoint-dir is empty; give a folder path (default: checkpoints)")
    folds = recipe.ensemble.folds
    if folds == 1 or (folds and (recipe.ensemble.full_train or recipe.ensemble.ensemble > 1)):
        raise UserError("--folds K takes K >= 2 and makes the K members itself: drop --ensemble and --full-train, "
                        "or use --folds 0")
    if recipe.train.best_epoch and (folds or recipe.ensemble.full_train):
        why = ("--folds scores those rows out of fold, and picking on them would make that figure optimistic"
               if folds else "--full-train leaves none")
        raise UserError(f"--best-epoch picks each model's epoch on its validation rows, but {why}: drop --best-epoch")
    if options.mix not in (None, "none") and member_count(recipe) == 1:
        raise UserError(f"--mix {options.mix} makes every other member of an ensemble another architecture, but "
                        f"this run trains one model: add --folds K or --ensemble N, or drop --mix")
    if options.mix_epochs and (recipe.ensemble.mix == "none" or member_count(recipe) == 1):  # given, not a preset's
        fix = "add --mix ARCH" if recipe.ensemble.mix == "none" else "add --folds K or --ensemble N"
        raise UserError(f"--mix-epochs {options.mix_epochs} sets the epochs of the --mix members, but this run has "
                        f"none: {fix}, or drop --mix-epochs")
    if options.elastic_sigma is not None and not recipe.augment.elastic_alpha:
        raise UserError(f"--elastic-sigma {options.elastic_sigma:g} shapes the elastic distortion, which is off: add "
                        f"--elastic PIXELS, or drop --elastic-sigma")
    if options.dry_run and options.resume:
        raise UserError("--dry-run writes into a temporary folder, so there is nothing to --resume there; drop one")


def round_folders(options, recipe):
    """The checkpoint folder of each round: the second holds the pseudo-labelled members."""
    return [options.checkpoint_dir] + ([os.path.join(options.checkpoint_dir, "round2")]
                                       if recipe.ensemble.pseudo_label else [])


def writes_report(options, recipe):
    """Whether the run writes a report: asked for, and not --full-train, which leaves nothing to report on."""
    return bool(options.report) and not recipe.ensemble.full_train


def report_folder_to_lock(options, recipe):
    """The --report folder this run locks, as it locks its --checkpoint-dir, so that two runs never
    mix their reports; None without a report, or where the checkpoint folder holds it (or is it),
    whose exclusive lock covers it then. A report folder above the checkpoints is locked first."""
    if not writes_report(options, recipe):
        return None
    report, checkpoints = os.path.realpath(options.report), os.path.realpath(options.checkpoint_dir)
    return None if os.path.commonpath([report, checkpoints]) == checkpoints else options.report


def planned_outputs(options, recipe):
    """[(flag, path, Kind)] of every file the run will write, for the checks before it starts."""
    outputs = [("--submission", options.submission, SUBMISSION),
               ("--checkpoint-dir", os.path.join(options.checkpoint_dir, HOLDER_FILE), HOLDER)]
    if report_folder_to_lock(options, recipe):
        outputs.append(("--report", os.path.join(options.report, HOLDER_FILE), HOLDER))
    if writes_report(options, recipe):
        outputs += [("--report", path, kind) for path, kind in report_files(options.report)]
    outputs += [("--checkpoint-dir", os.path.join(folder, name), kind)
                for checkpoint_dir in round_folders(options, recipe)
                for folder in member_folders(recipe, checkpoint_dir) for name, kind in CHECKPOINT_FILES.items()]
    return outputs


def check_run_outputs(options, recipe):
    """Find the data, then OutputError for any output the run must not write (see files.py)."""
    options.data = find_data(options.data)  # data/, the Kaggle CLI's zip, or a notebook's input folder
    if os.path.exists(options.checkpoint_dir) and not os.path.isdir(options.checkpoint_dir):
        raise OutputError(f"--checkpoint-dir {options.checkpoint_dir}: is a file, not a folder; pass a folder path")
    inputs = source_files(options.data, "train.csv") + source_files(options.data, "test.csv")
    check_outputs(planned_outputs(options, recipe), inputs, names_read_as_data(options.data))
    check_no_stale_members(options, recipe)


def check_no_stale_members(options, recipe):
    """OutputError if an earlier run with more members left memberK/ folders this run would
    not overwrite: a `member*/best.pt` glob would then mix the two runs' models."""
    for folder in round_folders(options, recipe):
        stale = stale_member_folders(recipe, folder)
        if stale:
            raise OutputError(f"--checkpoint-dir {options.checkpoint_dir}: {', '.join(stale)} left by an earlier run "
                              f"with more members; `member*/best.pt` would mix them with this run's "
                              f"{member_count(recipe)}: move them away or pass another --checkpoint-dir")


def remove_earlier_run(options, recipe):
    """A fresh run removes what an earlier run left in its member folders, which it would
    overwrite anyway: every last.pt (a --resume of this run would take a member holding one as
    begun, and continue the earlier run's), and the checkpoints of every member after the first
    (cut short, this run would leave `member*/best.pt` mixing the two runs). The first model's
    best.pt stays until this run's replaces it, so a run that fails at once still leaves one.
    A link stays, and so does its target, which may be outside the locked folder: this run
    writes through it."""
    for checkpoint_dir in round_folders(options, recipe):
        for index, folder in enumerate(member_folders(recipe, checkpoint_dir)):
            for path in [os.path.join(folder, name) for name in (CHECKPOINT_FILES if index else ["last.pt"])]:
                if not os.path.islink(path):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)


def other_shapes_left(options, recipe):
    """The checkpoint files (relative paths) an earlier run of another shape left in
    --checkpoint-dir, which `inference.py --checkpoint checkpoints/best.pt` (or `member*/best.pt`)
    would take for this run's: a single model's beside this ensemble's member*/, member*/ beside
    this single model, a round2/ without --pseudo-label. Only files this suite wrote; never
    through a link inside the folder. They stay: one may be an unfinished run's, to resume."""
    ours = {os.path.realpath(folder) for round_dir in round_folders(options, recipe)
            for folder in member_folders(recipe, round_dir)}
    round2 = os.path.join(options.checkpoint_dir, "round2")
    found = []
    for round_dir in [options.checkpoint_dir] + ([round2] if not os.path.islink(round2) else []):
        if not os.path.isdir(round_dir):
            continue
        members = [path for path in existing_member_folders(round_dir).values() if not os.path.islink(path)]
        for folder in [round_dir, *members]:
            if os.path.realpath(folder) in ours:
                continue
            for name, kind in CHECKPOINT_FILES.items():
                path = os.path.join(folder, name)
                with contextlib.suppress(OSError):
                    if os.path.isfile(path) and not os.path.islink(path) and kind.wrote(read_head(path)):
                        found.append(os.path.relpath(path, options.checkpoint_dir))
    return found


def load_data(options, recipe, log):
    """(all of train.csv as a DigitDataset, test images), checked before any training."""
    images, labels = load_train(options.data, log=log)
    test_images = load_test(options.data, log=log)  # read (and checked) before training, not after
    fewest = min((count for count in torch.bincount(labels, minlength=10).tolist() if count), default=0)
    if recipe.ensemble.folds > fewest:  # a fold would hold out no row of that digit, some none at all
        raise DataError(f"--folds {recipe.ensemble.folds} needs at least {recipe.ensemble.folds} training rows of "
                        f"every digit, but one digit has {fewest}; lower --folds or add data")
    held_out = 1 / recipe.ensemble.folds if recipe.ensemble.folds else VAL_FRACTION
    check_training_set(options.data, labels, 0 if recipe.ensemble.full_train else held_out, log=log)
    fewest_rows = min(len(member.train_rows) for member in plan(recipe, labels, options.checkpoint_dir, options.seed))
    if fewest_rows < recipe.train.batch_size:  # the real split: stratified folds differ by a row a digit
        raise DataError(f"--batch-size {recipe.train.batch_size} is larger than the {fewest_rows:,} training "
                        f"images of a model; lower it or add data")
    return DigitDataset(images, labels), test_images


def train_members(options, members, full, device, log, extra=None):
    """Train every member (on its rows plus the `extra` dataset); returns the histories."""
    histories = []
    for member in members:
        if len(members) > 1:
            log(f"member {member.index + 1}/{len(members)} ({member.recipe.model.arch}, "
                f"{member.recipe.train.epochs} epochs, seed {member.seed}, "
                f"{len(member.train_rows) + (len(extra) if extra else 0):,} training images) -> {member.folder}")
        torch.manual_seed(member.seed)
        model = build_model(member.recipe.model)
        # A resumed ensemble continues the member that was cut off and starts the ones never begun.
        resume = options.resume and os.path.exists(os.path.join(member.folder, "last.pt"))
        # progress=None: bars only when stderr is a terminal; --quiet also drops the per-epoch lines.
        histories.append(train(model, with_extra(full.subset(member.train_rows), extra), full.subset(member.val_rows),
                               member.recipe, device, member.folder, seed=member.seed, resume=resume,
                               max_steps_per_epoch=1 if options.dry_run else 0,
                               log=(lambda message: None) if options.quiet else log,
                               progress=False if options.quiet else None))
    return histories


def evaluate_members(recipe, members, full, test_images, device, log):
    """(validation set, its probabilities, test probabilities) of the submitted predictor.

    Under --folds the validation set is all of train.csv, each row predicted by the member
    that held it out (out of fold); else the shared validation split, by the whole ensemble.
    """
    models = load_models([os.path.join(m.folder, "best.pt") for m in members], device)
    predict = lambda chosen, images: predict_probs(chosen, images, device, tta=recipe.ensemble.tta)  # noqa: E731
    views = ", TTA" if recipe.ensemble.tta else ""
    if recipe.ensemble.folds:
        val_set, val_probs = full, out_of_fold_probs(members, models, full, predict)
        what = f"out-of-fold accuracy ({len(models)} folds, each row by the model that never saw it{views})"
    else:
        val_set = full.subset(members[0].val_rows)
        val_probs = predict(models, val_set.images)  # (0, 10) under --full-train
        what = f"validation accuracy of the submitted predictor ({len(models)} model(s){views})"
        if recipe.train.best_epoch:
            what += f" [{figure_caveat(recipe)}]"
    if len(val_set):
        log(f"{what}: {(val_probs.argmax(1) == val_set.labels).float().mean().item():.4f}")
    return val_set, val_probs, predict(models, test_images)


def figure_caveat(recipe):
    """Why the submitted predictor's validation (or out-of-fold) figure is optimistic, or ''."""
    if recipe.train.best_epoch:
        return "optimistic: --best-epoch picked each model's epoch on these images"
    if recipe.ensemble.folds and recipe.ensemble.pseudo_label:
        return ("slightly optimistic: its pseudo-labels come from round 1's whole ensemble, whose other members "
                "trained on each member's held-out fold")
    return ""


def evaluate_on_rank_0(recipe, members, full, test_images, device, log):
    """evaluate_members by rank 0, which wrote the best.pt files (another machine's ranks may not
    see its disk, nor another rank a dry run's temporary folder); the other ranks get its test
    probabilities, so round 2's pseudo-labels are the same everywhere, and no validation set."""
    rank, _ = rank_and_world_size()
    if rank == 0:
        val_set, val_probs, test_probs = evaluate_members(recipe, members, full, test_images, device, log)
    else:
        val_set, val_probs = full.subset(torch.arange(0)), torch.zeros(0, NUM_CLASSES)
        test_probs = torch.zeros(len(test_images), NUM_CLASSES)
    return val_set, val_probs, share_from_rank_0(test_probs, device)


def write_run_report(options, recipe, histories, sets, probabilities, seconds, log):
    """reports/ for the submitted predictor: validation errors, test-set confidence, the recipe."""
    full, val_set, test_images = sets
    val_probs, test_probs = probabilities
    if not len(val_set):
        stale = "; the report there is an earlier run's" if holds_a_report(options.report) else ""
        log(f"no report in {options.report}: --full-train leaves no validation images to report on{stale}")
        return
    caveat = figure_caveat(recipe)
    settings = {"preset": options.preset, "seed": options.seed, "data": options.data,
                **{key: ", ".join(map(str, v)) if isinstance(v, tuple) else v
                   for key, v in flatten_settings(recipe).items()}}
    write_report(options.report, val_set, val_probs, history=histories[-1], augment_config=recipe.augment,
                 train_set=full, log=log, line_numbers=val_set.line_numbers, test_images=test_images,
                 test_probabilities=test_probs, recipe=settings,
                 summary={"models": len(histories), "seconds to train and predict": round(seconds),
                          **({"note": caveat} if caveat else {})},
                 name="out-of-fold" if recipe.ensemble.folds else "validation")


def train_rounds(options, recipe, full, test_images, device, log):
    """Train the members (and, with --pseudo-label, a second round on the confident test
    images too); returns the members submitted, their histories, the validation set, its
    probabilities and the test probabilities."""
    members = plan(recipe, full.labels, options.checkpoint_dir, options.seed)
    histories = train_members(options, members, full, device, log)
    val_set, val_probs, test_probs = evaluate_on_rank_0(recipe, members, full, test_images, device, log)
    if recipe.ensemble.pseudo_label:
        extra = pseudo_labelled(test_images, test_probs, recipe.ensemble.pseudo_label)
        log(f"pseudo-labels: {len(extra):,} of {len(test_images):,} test images at probability >= "
            f"{recipe.ensemble.pseudo_label:g} join every member's training rows for round 2")
        if not len(extra) and len(test_images):
            log(f"note: the surest test prediction reads {float(test_probs.max()):.3f} (label smoothing keeps even "
                f"sure ones near 0.91), so round 2 trains on train.csv alone, as round 1 did: use a lower "
                f"--pseudo-label")
        members = plan(recipe, full.labels, os.path.join(options.checkpoint_dir, "round2"), options.seed)
        histories = train_members(options, members, full, device, log, extra)
        if recipe.ensemble.folds:
            log(f"note: round 2's out-of-fold figure is {figure_caveat(recipe)}")
        val_set, val_probs, test_probs = evaluate_on_rank_0(recipe, members, full, test_images, device, log)
    return members, histories, val_set, val_probs, test_probs


def check_resumable_folder(options, first):
    """CheckpointError when --resume finds no last.pt of the run's first member."""
    if os.path.exists(os.path.join(first.folder, "last.pt")):
        return
    other = os.path.join(options.checkpoint_dir, "member1" if first.folder == options.checkpoint_dir else "", "last.pt")
    hint = (f"but {other} is: resume with the --ensemble and --folds of the run that wrote it"
            if os.path.exists(other) else "start without --resume")
    raise CheckpointError(f"{os.path.join(first.folder, 'last.pt')}: nothing to resume (no such file); {hint}")


def rebuild_command(options, checkpoints):
    """The inference.py command that writes the run's submission again from `checkpoints` alone."""
    as_argument = lambda path: shell_word("./" + path if path.startswith("-") else path)  # noqa: E731
    device = "" if options.device == "auto" else f" --device {options.device}"  # as chosen, also on a GPU machine
    return (f"python {as_argument(command_path('inference.py'))} "
            f"--checkpoint {' '.join(map(as_argument, checkpoints))} "
            f"--input {as_argument(options.data)} --output {as_argument(options.submission)}{device}")


def train_and_submit(options, recipe, device, log=print):
    """Train, then write the submission and the report on the validation split.

    Returns {'histories', 'val_accuracy', 'submission', 'checkpoints', 'seconds', 'recipe'}, where
    val_accuracy is the submitted predictor's on the validation split (out of fold under --folds)
    and checkpoints the best.pt of each member submitted.
    """
    started = time.perf_counter()
    device = init_distributed(device)
    rank, world_size = rank_and_world_size()
    if rank:  # rank 0 alone logs and writes files
        log = lambda *_, **__: None  # noqa: E731
    check_run_outputs(options, recipe)
    full, test_images = load_data(options, recipe, log)
    if options.dry_run:
        full, test_images = dry_run_sample(full, test_images, recipe, log)
    first = plan(recipe, full.labels, options.checkpoint_dir, options.seed)[0]
    log_start(options, recipe, first, len(test_images), device, world_size, log)
    if options.resume:  # before the lock makes the folder
        check_resumable_folder(options, first)
    report_folder = report_folder_to_lock(options, recipe) if rank == 0 else None
    with (folder_lock(report_folder, "--report") if report_folder else contextlib.nullcontext(),
          folder_lock(options.checkpoint_dir, held_above=report_folder) if rank == 0 else contextlib.nullcontext()):
        if rank == 0 and not options.resume:
            remove_earlier_run(options, recipe)
        options.training_started = True  # from here on, a last.pt there is this run's (print_resume_hint)
        members, histories, val_set, val_probs, test_probs = train_rounds(options, recipe, full, test_images,
                                                                          device, log)
        if rank == 0:  # every rank ends with the same weights; one writes
            write_submission(options.submission, test_probs.argmax(1))
            if options.report:
                write_run_report(options, recipe, histories, (full, val_set, test_images), (val_probs, test_probs),
                                 time.perf_counter() - started, log)
    wait_for_peers()  # every rank returns once rank 0 has written
    seconds = time.perf_counter() - started
    log(f"wrote {options.submission} ({len(test_images):,} rows) in {seconds:.0f}s")
    checkpoints = [os.path.join(m.folder, "best.pt") for m in members]  # under --pseudo-label, round 2's
    left = other_shapes_left(options, recipe) if rank == 0 else []
    if left:
        shown = ", ".join(left[:6]) + (f" and {len(left) - 6} more" if len(left) > 6 else "")
        log(f"note: {options.checkpoint_dir} also holds an earlier run's checkpoints of another shape, not this "
            f"run's ({shown}); they stay (one may be an unfinished run's to resume): move them away so that "
            f"no later command takes them for this run's")
    if not options.dry_run:
        log(f"the same file from the checkpoints alone: {rebuild_command(options, checkpoints)}")
    val_accuracy = (val_probs.argmax(1) == val_set.labels).float().mean().item() if len(val_set) else float("nan")
    return {"histories": histories, "val_accuracy": val_accuracy, "submission": options.submission,
            "checkpoints": checkpoints, "seconds": seconds, "recipe": recipe}


def log_start(options, recipe, first, test_rows, device, world_size, log):
    """The run's first lines: the data split, the device, and the settings a preset turned off."""
    processes = f" in each of {world_size} processes" if world_size > 1 else ""
    folds = f" (fold 1 of {recipe.ensemble.folds})" if recipe.ensemble.folds else ""
    log(f"data: {len(first.train_rows):,} train / {len(first.val_rows):,} validation{folds} / {test_rows:,} "
        f"test images; device {device} (training in {training_precision(device)}), "
        f"{torch.get_num_threads()} threads{processes}")
    preset_mix = preset(options.preset).ensemble.mix
    if member_count(recipe) == 1 and preset_mix != "none":
        log(f"one model: --preset {options.preset}'s --mix {preset_mix} applies to ensembles only, so it is off")
    if recipe.ensemble.full_train:
        log(f"full-train: no validation split; the model after epoch {recipe.train.epochs} is the one submitted")


def dry_run_sample(full, test_images, recipe, log):
    """A dry run checks all of both CSVs, then trains and predicts on a stratified sample of
    train.csv and the first test images: every step of the run, in seconds."""
    rows = max(DRY_RUN_ROWS, 4 * recipe.train.batch_size)  # a batch for every member, whatever its split
    sample = full.subset(stratified_split(full.labels, rows / len(full), seed=0)[1]) if rows < len(full) else full
    log(f"dry run: {len(sample):,} of {len(full):,} train.csv rows and {min(DRY_RUN_ROWS, len(test_images)):,} of "
        f"{len(test_images):,} test images")
    return sample, test_images[:DRY_RUN_ROWS]


@contextlib.contextmanager
def dry_run_outputs(options, recipe, log):
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
        if rank_and_world_size()[0] == 0:  # one line, not one per torchrun process
            report = ", the report too" if writes_report(options, recipe) else ""
            log(f"dry run: everything worked; its outputs (in {folder}{report}) "
                f"were temporary and are removed now, nothing else was written")
    except OutputError as e:  # no flag moves the temporary folder: TMPDIR does
        raise OutputError(f"{e} (in the dry run's temporary folder: set TMPDIR to another folder)") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run(options, recipe, log):
    device = choose_device(options.device)  # chosen once, here
    if options.dry_run:  # what the real run would refuse, its dry run refuses too
        check_run_outputs(options, recipe)
        if os.environ.get("RANK", "0") == "0":  # rank 0 alone locks (two ranks' probes would clash)
            report_folder = report_folder_to_lock(options, recipe)
            if report_folder:
                check_unlocked(report_folder, "--report")
            check_unlocked(options.checkpoint_dir, held_above=report_folder)
    with dry_run_outputs(options, recipe, log):
        results = train_and_submit(options, recipe, device, log)
    if options.dry_run:  # its files are gone: no paths to open
        results.update(submission=None, checkpoints=[])
    return results


def run(*, log=print, **flags):
    """Train and write the submission from Python: the command line's flags as keyword
    arguments (`run(data="data/", preset="fast", epochs=3, tta=True)`).

    Returns the results dict of `train_and_submit`; bad input raises UserError (a
    DataError, CheckpointError or OutputError), a diverged run TrainingDiverged.
    """
    if not callable(log):
        raise UserError(f"run(log={log!r}): give a function that takes a line, such as print")
    # keyword -> its flag's action: rotate= is --rotate, whose value argparse keeps as rotate_deg
    actions = {action.option_strings[0][2:].replace("-", "_"): action for action in build_parser()._actions
               if action.dest != "help"}
    # on/off flag -> the flag that turns it off: --no-tta; '' for --resume, which is off unless given
    switches = {name: next((s for s in action.option_strings if s.startswith("--no-")), "")
                for name, action in actions.items() if action.nargs == 0}
    argv = []
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        if name.startswith("no_") and name[3:] in switches:  # no_tta=[] would otherwise turn TTA off
            raise UserError(f"run({name}={value!r}): write {name[3:]}=False or {name[3:]}=True")
        # checked here: argparse would take a prefix of a setting (epoch=1) as the setting
        if name not in actions:
            raise UserError(f"run({name}={value!r}): no such setting; the settings are main.py's flags, "
                            f"with _ for - (python main.py --help)")
        if name == "report" and value is False:
            value = ""  # no report, as --report ''
        if value is None:
            continue  # as if not given
        if name in switches:
            if not isinstance(value, bool):
                raise UserError(f"run({name}={value!r}): give True or False")
            argv += [flag] if value else [switches[name]] if switches[name] else []
        elif isinstance(value, bool):
            raise UserError(f"run({name}={value!r}): {flag} takes a value")
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv.append(f"{flag}={value}")  # one token: a value such as '-x.csv' is not read as a flag
    options, recipe = parse_args(argv, _RaisingParser)
    cpu_state = torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        return _run(options, recipe, log)
    except BaseException as error:
        drop_traceback_locals(error)
        raise
    finally:  # the run seeds torch; the notebook's own random streams go on as they were
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def main(argv=None) -> int:
    prepare_output()
    options, recipe = parse_args(argv)
    rank_0 = os.environ.get("RANK", "0") == "0"  # one message, not one per torchrun process

    def after_error(error):
        if isinstance(error, (OutputError, LogError)) and getattr(options, "training_started", False) and rank_0:
            print_resume_hint(argv, options, recipe, after_error=True)  # a write failed mid-run (a full disk)

    def after_interrupt():  # SIGTERM stops like Ctrl-C: last.pt holds the last whole epoch
        if rank_0:
            print_resume_hint(argv, options, recipe)
    try:
        return run_command(lambda _: _run(options, recipe, print), None, failures=(TrainingDiverged,),
                           interrupted=after_interrupt, failed=after_error)
    except BaseException as error:  # a bug: its traceback follows
        drop_traceback_locals(error)
        raise
    finally:
        close_distributed()


def command_path(script):
    """This suite's `script` as a printed command names it: the bare name in the suite's own
    folder, else its full path, so the command runs from the folder the run was started in."""
    folder = os.path.dirname(os.path.realpath(__file__))
    return script if folder == os.path.realpath(os.getcwd()) else os.path.join(folder, script)


def print_resume_hint(argv, options, recipe, after_error=False):
    """After Ctrl-C, or an error that stopped the run: how to go on (from last.pt where this run wrote one)."""
    flags = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--resume"]
    script = shell_word(command_path("main.py"))
    command = f"torchrun <same options> {script}" if "WORLD_SIZE" in os.environ else f"python {script}"
    first_last_pt = os.path.join(member_folders(recipe, options.checkpoint_dir)[0], "last.pt")
    this_runs = options.resume or getattr(options, "training_started", False)  # else an earlier run's last.pt
    if options.dry_run or not this_runs or not os.path.exists(first_last_pt):
        if not after_error:  # the error's own line says what to do
            print("\ninterrupted before the first checkpoint; start again with the same command", file=sys.stderr)
    else:
        what = "the epochs done are kept; once that is fixed, resume" if after_error else "interrupted; resume"
        print(f"\n{what} with: {command} --resume {' '.join(map(shell_word, flags))}".rstrip(), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
