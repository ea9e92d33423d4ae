"""Predict the Kaggle test set with one or more checkpoints and write the submission.

Usage:
    python inference.py --checkpoint checkpoints/best.pt                # data/ or the Kaggle input folder
    python inference.py --checkpoint checkpoints/best.pt --input ../shared/data/digit-recognizer.zip
    python inference.py --checkpoint a/best.pt b/best.pt --no-tta --output ensemble.csv
    python inference.py --checkpoint checkpoints/best.pt --input data/ --report reports/  # data/'s train.csv

Several checkpoints are an ensemble: their softmax outputs are averaged. Test-time
augmentation follows the recipe stored in the checkpoints, so the submission main.py wrote
is repeated, unless --tta or --no-tta says otherwise. The test file is read, predicted and
(with --probs) written out chunk by chunk; only the predicted labels are kept, one byte a
row, so memory stays bounded however many rows it has.
With --report the input is a labelled, train.csv-shaped file: it is scored and reported
on instead of predicted for Kaggle (no submission is written). Scored on the whole
train.csv, a checkpoint is judged mostly on images it was trained on: expect optimistic
numbers.
"""

import argparse
import collections
import contextlib
import filecmp
import functools
import os
import stat
import sys
from typing import NamedTuple

import torch

from DigitRecognizerModel import NUM_CLASSES, CheckpointError, load_checkpoint, model_from_checkpoint
from cli import ArgumentParser, UserError, choose_device, path_argument, run_command
from dataloader import (CHUNK_ROWS, DataError, DigitDataset, NoLabelColumn, find_data, iter_digit_csv, load_digit_csv,
                        names_read_as_data, resolve_csv, source_files, warp)
from files import HOLDER, HOLDER_FILE, Kind, atomic_open, check_outputs, folder_lock, written_together
from report import report_files, write_report


class View(NamedTuple):
    """A fixed warp of every test image: rotation in degrees, shifts in pixels."""
    rotate_deg: float = 0.0
    shift_x_px: float = 0.0
    shift_y_px: float = 0.0


# Test-time augmentation: the image itself plus small shifts and rotations; the softmax
# outputs over all views are averaged.
TTA_VIEWS = [View(), View(0, 1, 0), View(0, -1, 0), View(0, 0, 1), View(0, 0, -1), View(8, 0, 0), View(-8, 0, 0)]
# Kaggle's submission format has no room for a mark: any file in it counts as an earlier run's
SUBMISSION = Kind("a submission CSV", b"ImageId,Label\n")
PROBABILITIES = Kind("a probabilities CSV", ("ImageId," + ",".join(f"p{k}" for k in range(NUM_CLASSES)) + "\n").encode())


def eval_batch_size(device):
    # On 2 CPU cores a small batch keeps the activations in cache (see the README's speed
    # section); a GPU wants big batches.
    return 4096 if device.type == "cuda" else 256


@functools.cache
def computes_bf16(device) -> bool:
    """Whether `device` has bf16 arithmetic in hardware: CUDA GPUs from Ampere on (compute
    capability 8; a T4 or P100 emulates it, slower than float32) and CPUs with AVX512_BF16
    (AMD Zen 4 on, Intel Xeon from Cooper Lake on; elsewhere oneDNN emulates it too)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    supported = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # private, so looked up with care
    return device.type == "cpu" and callable(supported) and supported()


def uses_bf16(device, training=False) -> bool:
    """Whether autocast computes in bf16: where `device` does so natively, except when
    predicting on a CPU, which stays float32 on every CPU: it is fast already, and a
    checkpoint then predicts the same on every machine, and the same as its ONNX export."""
    return computes_bf16(device) and (training or device.type == "cuda")


def autocast(device, training=False):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(device, training))


def training_precision(device) -> str:
    """'bf16' or 'float32': what training on `device` computes in, for the log and bench.py."""
    return "bf16" if uses_bf16(device, training=True) else "float32"


@torch.inference_mode()
def predict_logits(model, images, device, batch_size=None, view: View = View()):
    """Logits (N, classes) in float32 for uint8 images (N, 1, 28, 28), in eval mode."""
    model.eval()
    batch_size = batch_size or eval_batch_size(device)
    outputs = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device, non_blocking=True).float().div_(255)
        if view != View():
            x = warp(x, *view)
        with autocast(device):
            logits = model(x.contiguous(memory_format=torch.channels_last))
        outputs.append(logits.float())
    return torch.cat(outputs) if outputs else torch.zeros(0, NUM_CLASSES, device=device)


def load_models(paths, device):
    """The models of checkpoint `paths`, BatchNorm folded, ready to predict on `device`."""
    return [ready_to_predict(load_checkpoint(path), path, device) for path in paths]


def load_each_once(paths, device):
    """(states, models) of checkpoint `paths` as given on the command line: each loaded and
    checked, then refused if given twice, then ready to predict on `device`."""
    states = [load_checkpoint(path) for path in paths]
    check_each_once(paths)  # once each is known to be a checkpoint
    return states, [ready_to_predict(state, path, device) for state, path in zip(states, paths)]


def ready_to_predict(state, path, device):
    """The model of a loaded checkpoint `state` (from `path`), BatchNorm folded, on `device`."""
    model = model_from_checkpoint(state, path).fuse_batchnorm_()
    model.checkpoint_path = path  # for predict_probs's message
    return model.to(device).to(memory_format=torch.channels_last)


def trained_with_tta(states, log=print):
    """Whether the runs that wrote these checkpoints submitted with TTA (the recipe each stores);
    where they disagree, not, and a note says so."""
    used = [state.get("identity", {}).get("tta") is True for state in states]
    if any(used) and not all(used):
        log(f"note: {sum(used)} of these {len(used)} checkpoints were submitted with TTA, the others without; "
            f"predicting without it (pass --tta to use it)")
    return all(used)


def check_each_once(paths):
    """UserError if one checkpoint is given twice (`a/best.pt ./a/best.pt`, or a copy of it):
    it would count twice in the average."""
    seen, by_size = {}, collections.defaultdict(list)  # (device, inode) -> path; size -> paths
    for path in paths:
        try:
            status = os.stat(path)
        except OSError:  # a missing file: loading it says so
            continue
        inode = (status.st_dev, status.st_ino)
        if inode in seen:
            raise UserError(f"--checkpoint {path}: is {seen[inode]} again; each checkpoint counts once in the "
                            f"average, so give it once")
        if stat.S_ISREG(status.st_mode):
            copied = next((other for other in by_size[status.st_size] if _same_bytes(other, path)), None)
            if copied is not None:
                raise UserError(f"--checkpoint {path}: holds the same bytes as {copied}, so the same model; each "
                                f"model counts once in the average, so give it once")
            by_size[status.st_size].append(path)
        seen[inode] = path


def _same_bytes(path, other):
    try:
        return filecmp.cmp(path, other, shallow=False)
    except OSError:  # unreadable: loading it says so
        return False


def predict_probs(models, images, device, tta=False):
    """Class probabilities (N, classes), averaged over models and (with tta) views."""
    views = TTA_VIEWS if tta else TTA_VIEWS[:1]
    images = images.to(device)  # once, not once per model and view
    total = None
    for model in models:
        for view in views:
            probs = predict_logits(model, images, device, view=view).softmax(1)
            if not torch.isfinite(probs).all():  # finite weights can still overflow: a damaged file
                raise CheckpointError(f"{getattr(model, 'checkpoint_path', 'the model')}: gives NaN or Inf "
                                      f"probabilities (damaged weights?); use a checkpoint from a run that finished")
            total = probs if total is None else total + probs
    return (total / (len(models) * len(views))).cpu()


def predict_file(models, input_path, device, tta=False, probs_file=None, log=print):
    """Predicted labels (N,) uint8 for every row of a test CSV, read chunk by chunk.

    With `probs_file` (an open text file), each chunk's probabilities are written to it as
    ImageId,p0..p9 rows as they come, so they never pile up in memory.
    """
    labels, rows = [], 0
    for images, _ in iter_digit_csv(input_path, "test.csv", labelled=False, log=log):
        probs = predict_probs(models, images, device, tta)
        if probs_file is not None:
            write_probability_rows(probs_file, probs, first_image_id=rows + 1)
        labels.append(probs.argmax(1).to(torch.uint8))
        rows += len(images)
    return torch.cat(labels)


def write_probability_rows(f, probs, first_image_id=1):
    """ImageId,p0..p9 rows of `probs` (n, classes) to an open text file; the header with the first."""
    if first_image_id == 1:
        f.write("ImageId," + ",".join(f"p{k}" for k in range(probs.shape[1])) + "\n")
    f.writelines(f"{i}," + ",".join(f"{p:.6f}" for p in row) + "\n"
                 for i, row in enumerate(probs.tolist(), start=first_image_id))


def score_labelled(models, input_path, device, tta=False, log=print):
    """(dataset, probabilities (N, classes), the file's name) of the models on a labelled CSV."""
    try:
        images, labels = load_digit_csv(input_path, "train.csv", labelled=True, log=log)
    except NoLabelColumn as e:
        raise DataError(f"--report needs labelled input: {e}") from None
    name = os.path.basename(resolve_csv(input_path, "train.csv")[0])  # a folder's train.csv, zip.zip:train.csv
    return DigitDataset(images, labels), predict_probs(models, images, device, tta), name


def report_scores(report_dir, dataset, probs, name, settings, log=print):
    """Write the report of `probs` on the labelled `dataset` from file `name`; `settings` (the
    checkpoints, the input, TTA) go on its page. Returns {file name: path}."""
    log("note: rows a checkpoint trained on score optimistically (a default run trains on 90% of train.csv): "
        "for an honest figure, report on rows it never saw")
    return write_report(report_dir, dataset, probs, name=name, log=log, line_numbers=dataset.line_numbers,
                        lines_in=name, recipe=settings)


def write_submission(path, predictions, together=None):
    """Kaggle submission: header ImageId,Label; ImageId counts from 1. Streamed, atomic
    (`together`: see files.atomic_open)."""
    with atomic_open(path, together=together) as f:
        f.write("ImageId,Label\n")
        for start in range(0, len(predictions), CHUNK_ROWS):
            block = predictions[start:start + CHUNK_ROWS].tolist()
            f.writelines(f"{i},{label}\n" for i, label in enumerate(block, start=start + 1))


def parse_args(argv):
    parser = ArgumentParser(description="Write a Kaggle submission from trained checkpoints, "
                                        "or (--report) score them on a labelled file.")
    parser.add_argument("--checkpoint", nargs="+", action="extend", required=True, metavar="PATH",
                        type=path_argument,
                        help="one or more checkpoints (the flag may repeat); several are averaged as an ensemble "
                             "(required)")
    parser.add_argument("--input", default=None, type=path_argument,
                        help="test.csv, test.csv.gz, a folder holding it, or the Kaggle zip; with --report a "
                             "labelled train.csv-shaped file, folder or zip (default: test.csv, with --report "
                             "train.csv, from the first of data/, data/digit-recognizer.zip and "
                             "/kaggle/input/digit-recognizer/ that holds it)")
    parser.add_argument("--output", default=None, help="submission path (default: final_submission.csv)")
    parser.add_argument("--report", default=None, metavar="DIR",
                        help="score the labelled --input instead of writing a submission, and write the confusion "
                             "matrix, worst errors and per_class_accuracy.csv here (default: off)")
    parser.add_argument("--probs", default=None, metavar="PATH",
                        help="also write per-class probabilities ImageId,p0..p9 here; the models were trained "
                             "with label smoothing 0.1, so a sure prediction reads about 0.91, not 1.0 "
                             "(default: off)")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="average over shifted/rotated views (default: as the checkpoints were trained to be "
                             "submitted, so main.py's submission is repeated: on for the default and best presets, "
                             "off for fast)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: auto)")
    args = parser.parse_args(argv)
    if args.report == "":
        parser.error("--report '' names no folder; give the folder for the report")
    if args.report is not None and args.output is not None:
        parser.error("--report scores a labelled file and writes no submission; drop --output")
    if args.output is None and args.report is None:
        args.output = "final_submission.csv"  # '' stays '' and is refused: never the default file by accident
    return args


def planned_outputs(args):
    """[(flag, path, Kind)] of every file this command will write."""
    outputs = [("--output", args.output, SUBMISSION)] if args.output is not None else []
    if args.probs is not None:
        outputs.append(("--probs", args.probs, PROBABILITIES))
    if args.report is not None:
        outputs.append(("--report", os.path.join(args.report, HOLDER_FILE), HOLDER))
        outputs += [("--report", path, kind) for path, kind in report_files(args.report, training_run=False)]
    return outputs


def run(args, log=print):
    """Predict (or, with --report, score) and write; returns the number of rows predicted."""
    name = "train.csv" if args.report is not None else "test.csv"
    args.input = find_data(args.input, names=(name,))  # data/, the Kaggle CLI's zip, or a notebook's input
    inputs = [*args.checkpoint, *source_files(args.input, name)]
    check_outputs(planned_outputs(args), inputs, names_read_as_data(args.input))
    device = choose_device(args.device)
    states, models = load_each_once(args.checkpoint, device)
    if args.tta is None:
        args.tta = trained_with_tta(states, log)
    if args.report is not None:  # locked as main.py locks its own: two reports never mix in one folder
        with folder_lock(args.report, "--report"), written_together() as together:  # --probs once the report is whole
            dataset, probs, name = score_labelled(models, args.input, device, args.tta, log)
            if args.probs:
                with atomic_open(args.probs, together=together) as probs_file:
                    write_probability_rows(probs_file, probs)
            report_scores(args.report, dataset, probs, name,
                          {"checkpoints": " ".join(args.checkpoint), "input": args.input, "tta": args.tta}, log)
        return len(probs)
    with written_together() as together:  # the submission and --probs: both replaced, or neither
        probs_output = atomic_open(args.probs, together=together) if args.probs else contextlib.nullcontext()
        with probs_output as probs_file:
            predictions = predict_file(models, args.input, device, tta=args.tta, probs_file=probs_file, log=log)
        write_submission(args.output, predictions, together)
    log(f"wrote {args.output} ({len(predictions):,} rows) from {len(models)} checkpoint(s)"
        f"{', with TTA' if args.tta else ''}")
    return len(predictions)


def main(argv=None) -> int:
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
