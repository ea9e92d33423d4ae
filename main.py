"""Train a CNN on Kaggle's Digit Recognizer data and write final_submission.csv.

Usage:
    pip install -r requirements.txt
    python main.py                                          # data/train.csv + data/test.csv
    python main.py --data ../shared/data/digit-recognizer.zip
    python main.py --preset fast                            # about a minute on 2 CPU cores
    python main.py --resume                                 # continue checkpoints/last.pt, same flags
    python main.py --dry-run                                # one batch of everything (smoke test)

Then submit: kaggle competitions submit -c digit-recognizer -f final_submission.csv -m "..."
"""

import os
import shlex
import signal
import sys
import time
from dataclasses import replace

import torch

from DigitRecognizerModel import CheckpointError, DigitRecognizerModel, ModelConfig
from dataloader import AugmentConfig, DataError, DigitDataset, check_output_file, load_test, load_train, stratified_split
from inference import ArgumentParser, load_models, predict_probs, user_error, write_submission
from trainer import TrainConfig, TrainingDiverged, choose_device, train

# ---------------------------------------------------------------------------- settings
# One block: each preset is a complete recipe; explicit flags override its values.
PRESETS = {
    "fast": dict(epochs=4, batch_size=128, lr=0.1, widths=(16, 32, 64)),
    "default": dict(epochs=30, batch_size=128, lr=0.1, widths=(16, 32, 64)),
}
VAL_FRACTION = 0.1  # stratified hold-out of train.csv used to pick best.pt and report accuracy


def parse_args(argv):
    parser = ArgumentParser(description="Train the digit recognizer and write a Kaggle submission.")
    parser.add_argument("--data", default="data/",
                        help="folder with train.csv and test.csv, or the Kaggle zip (default: data/)")
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS),
                        help="recipe: fast = quick look, default = leaderboard run (default: default)")
    parser.add_argument("--epochs", type=int, help="epochs (default: from --preset; default preset: 30)")
    parser.add_argument("--batch-size", type=int, help="training batch size (default: from --preset; 128)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: from --preset; 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed for split, init, shuffle and augmentation (default: 0)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto = cuda when available, else cpu (default: auto)")
    parser.add_argument("--checkpoint-dir", default="checkpoints", help="where best.pt and last.pt go (default: checkpoints)")
    parser.add_argument("--submission", default="final_submission.csv", help="submission path (default: final_submission.csv)")
    parser.add_argument("--resume", action="store_true", help="continue from <checkpoint-dir>/last.pt (default: off)")
    parser.add_argument("--dry-run", action="store_true", help="one batch of training and validation, one epoch (default: off)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    for key in ("epochs", "batch_size", "lr"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        parser.error("--epochs and --batch-size must be at least 1 and --lr above 0")
    args.widths = preset["widths"]
    return args


def run(args, log=print):
    """Train and write the submission; returns {'history', 'val_accuracy', 'submission', 'seconds'}."""
    started = time.perf_counter()
    device = choose_device(args.device)
    check_output_file(args.submission)  # fail now, not after training
    torch.manual_seed(args.seed)
    images, labels = load_train(args.data, log=log)
    test_images = load_test(args.data, log=log)  # read (and checked) before training, not after
    train_idx, val_idx = stratified_split(labels, VAL_FRACTION, args.seed)
    full = DigitDataset(images, labels)
    train_set, val_set = full.subset(train_idx), full.subset(val_idx)
    log(f"data: {len(train_set):,} train / {len(val_set):,} validation / {len(test_images):,} test images; "
        f"device {device}, {torch.get_num_threads()} threads")

    model = DigitRecognizerModel(ModelConfig(widths=args.widths))
    config = TrainConfig(epochs=1 if args.dry_run else args.epochs, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed, augment=AugmentConfig(), max_steps_per_epoch=1 if args.dry_run else 0)
    history = train(model, train_set, val_set, config, device, args.checkpoint_dir, resume=args.resume, log=log)

    best = os.path.join(args.checkpoint_dir, "best.pt")
    probs = predict_probs(load_models([best], device), test_images, device)
    write_submission(args.submission, probs.argmax(1))
    best_accuracy = max(row["val_accuracy"] for row in history)
    seconds = time.perf_counter() - started
    log(f"best validation accuracy {best_accuracy:.4f}; wrote {args.submission} "
        f"({len(test_images):,} rows) in {seconds:.0f}s")
    return {"history": history, "val_accuracy": best_accuracy, "submission": args.submission, "seconds": seconds}


def main(argv=None) -> int:
    args = parse_args(argv)
    # SIGTERM stops like Ctrl-C: last.pt on disk is the last completed epoch.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        run(args)
    except (DataError, CheckpointError, ValueError, OSError) as e:
        return user_error(e)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        flags = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--resume"]
        if not os.path.exists(os.path.join(args.checkpoint_dir, "last.pt")):
            print("\ninterrupted before the first checkpoint; start again with the same command", file=sys.stderr)
        else:
            print(f"\ninterrupted; resume with: python main.py --resume {shlex.join(flags)}".rstrip(), file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
