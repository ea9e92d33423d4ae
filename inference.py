"""Predict the Kaggle test set with one or more checkpoints and write the submission.

Usage:
    python inference.py --checkpoint checkpoints/best.pt
    python inference.py --checkpoint checkpoints/best.pt --input ../shared/data/digit-recognizer.zip
    python inference.py --checkpoint a/best.pt b/best.pt --tta --output ensemble.csv
    python inference.py --checkpoint checkpoints/best.pt --input ../shared/data/digit-recognizer.zip --report reports/

Several checkpoints are an ensemble: their softmax outputs are averaged. The test file
is read, predicted and (with --probs) written out chunk by chunk; only the predicted
labels are kept, one byte a row, so memory stays bounded however many rows it has.
With --report the input is a labelled, train.csv-shaped file: it is scored and reported
on instead of predicted for Kaggle (no submission is written). Scored on the whole
train.csv, a checkpoint is judged mostly on images it was trained on: expect optimistic
numbers.
"""

import argparse
import contextlib
import os
import sys

import torch

from DigitRecognizerModel import CheckpointError, load_checkpoint, model_from_checkpoint
from dataloader import (CHUNK_ROWS, DataError, DigitDataset, atomic_open, check_output_file, iter_digit_csv,
                        load_digit_csv, warp)
from report import prepare_report_dir, write_report
from trainer import choose_device, predict_logits

# Test-time augmentation: the image itself plus fixed small shifts (pixels) and rotations
# (degrees); the softmax outputs over all views are averaged.
TTA_VIEWS = [(0, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1), (8, 0, 0), (-8, 0, 0)]


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line and exits 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def user_error(error) -> int:
    print(f"error: {error}", file=sys.stderr)
    return 2


def load_models(paths, device):
    models = []
    for path in paths:
        model = model_from_checkpoint(load_checkpoint(path, map_location="cpu"), path).fuse_batchnorm_()
        models.append(model.to(device).to(memory_format=torch.channels_last))
    return models


def predict_probs(models, images, device, tta=False):
    """Class probabilities (N, classes), averaged over models and (with tta) views."""
    views = TTA_VIEWS if tta else TTA_VIEWS[:1]
    total = None
    for model in models:
        for rotate_deg, shift_x, shift_y in views:
            transform = None if (rotate_deg, shift_x, shift_y) == (0, 0, 0) else (
                lambda x, r=rotate_deg, dx=shift_x, dy=shift_y: warp(x, r, dx, dy))
            probs = predict_logits(model, images, device, transform=transform).softmax(1)
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


def report_file(models, input_path, report_dir, device, tta=False, log=print):
    """Score a labelled CSV and write the report into `report_dir`; returns (probabilities, paths)."""
    prepare_report_dir(report_dir)
    try:
        images, labels = load_digit_csv(input_path, "train.csv", labelled=True, log=log)
    except DataError as e:
        raise DataError(f"--report needs labelled input: {e}") from None
    probs = predict_probs(models, images, device, tta)
    name = os.path.basename(os.path.normpath(input_path))
    return probs, write_report(report_dir, DigitDataset(images, labels), probs, name=name, log=log)


def write_submission(path, predictions):
    """Kaggle submission: header ImageId,Label; ImageId counts from 1. Streamed, atomic."""
    with atomic_open(path) as f:
        f.write("ImageId,Label\n")
        for start in range(0, len(predictions), CHUNK_ROWS):
            block = predictions[start:start + CHUNK_ROWS].tolist()
            f.writelines(f"{i},{label}\n" for i, label in enumerate(block, start=start + 1))


def parse_args(argv):
    parser = ArgumentParser(description="Write a Kaggle submission from trained checkpoints, "
                                        "or (--report) score them on a labelled file.")
    parser.add_argument("--checkpoint", nargs="+", required=True, metavar="PATH",
                        help="one or more checkpoints; several are averaged as an ensemble (required)")
    parser.add_argument("--input", default=None,
                        help="test.csv, test.csv.gz, a folder holding it, or the Kaggle zip; with --report a "
                             "labelled train.csv-shaped file, folder or zip "
                             "(default: data/test.csv; with --report: data/train.csv)")
    parser.add_argument("--output", default=None, help="submission path (default: final_submission.csv)")
    parser.add_argument("--report", default=None, metavar="DIR",
                        help="score the labelled --input instead of writing a submission, and write the confusion "
                             "matrix, worst errors and per_class_accuracy.csv here (default: off)")
    parser.add_argument("--probs", default=None, metavar="PATH",
                        help="also write per-class probabilities ImageId,p0..p9 here (default: off)")
    parser.add_argument("--tta", action="store_true", help="average over shifted/rotated views (default: off)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="(default: auto)")
    args = parser.parse_args(argv)
    if args.report and args.output:
        parser.error("--report scores a labelled file and writes no submission; drop --output")
    args.input = args.input or ("data/train.csv" if args.report else "data/test.csv")
    args.output = args.output or "final_submission.csv"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        for path in filter(None, (args.output, args.probs)):
            check_output_file(path)
        device = choose_device(args.device)
        models = load_models(args.checkpoint, device)
        with atomic_open(args.probs) if args.probs else contextlib.nullcontext() as probs_file:
            if args.report:
                probs, _ = report_file(models, args.input, args.report, device, tta=args.tta)
                if probs_file is not None:
                    write_probability_rows(probs_file, probs)
            else:
                predictions = predict_file(models, args.input, device, tta=args.tta, probs_file=probs_file)
                write_submission(args.output, predictions)
    except (DataError, CheckpointError, ValueError, OSError) as e:
        return user_error(e)
    if not args.report:
        print(f"wrote {args.output} ({len(predictions):,} rows) from {len(models)} checkpoint(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
