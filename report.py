"""What a Kaggler looks at after training: curves, confusion matrix, worst errors, augmentation.

`write_report` turns a labelled dataset and a model's class probabilities on it into a
folder of PNGs plus `per_class_accuracy.csv`, and logs the per-class table. main.py calls
it for best.pt on the validation split; inference.py for any checkpoint(s) on a labelled
CSV. Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot state,
no display needed), rendered to memory and written atomically. matplotlib is imported
only here, inside the drawing functions, so the suite trains and predicts without it.
"""

import io
import math
import os

import numpy as np
import torch

from dataloader import AugmentConfig, DigitDataset, augment
from files import atomic_write_bytes, atomic_write_text

PER_CLASS_COLUMNS = ["digit", "images", "correct", "accuracy", "most_confused_with", "confused_count"]
SKIPPED_NO_MATPLOTLIB = "report skipped: matplotlib is not installed (pip install -r requirements.txt)"
WORST_ERRORS = 24  # cells in the worst-errors grid
AUGMENTED_VIEWS = 4  # augmented versions drawn under each original
DPI = 100


REPORT_FILES = ["per_class_accuracy.csv", "learning_curves.png", "confusion_matrix.png", "worst_errors.png",
                "augmentation.png"]


def report_files(report_dir):
    """Every file a report may write into `report_dir` (checked before a run starts)."""
    return [os.path.join(report_dir, name) for name in REPORT_FILES]


# ----------------------------------------------------------------------------- numbers

def confusion_matrix(labels, predictions, classes=10):
    """Counts (classes, classes) int64: row = true digit, column = predicted digit."""
    labels, predictions = labels.cpu().long(), predictions.cpu().long()
    return torch.bincount(labels * classes + predictions, minlength=classes * classes).view(classes, classes)


def per_class_accuracy(matrix):
    """One dict per digit (PER_CLASS_COLUMNS) from a confusion matrix; accuracy NaN for no images."""
    rows = []
    for digit in range(len(matrix)):
        images, correct = int(matrix[digit].sum()), int(matrix[digit, digit])
        wrong = matrix[digit].clone()
        wrong[digit] = 0
        confused = int(wrong.argmax())
        rows.append({
            "digit": digit,
            "images": images,
            "correct": correct,
            "accuracy": correct / images if images else float("nan"),
            "most_confused_with": confused if wrong[confused] else "",
            "confused_count": int(wrong[confused]),
        })
    return rows


def format_per_class(rows):
    """The per-class table as aligned text, with a total line."""
    images, correct = sum(r["images"] for r in rows), sum(r["correct"] for r in rows)
    lines = ["digit  images  correct  accuracy  most confused with"]
    for r in rows:
        confused = f"{r['most_confused_with']} ({r['confused_count']}x)" if r["confused_count"] else "-"
        lines.append(f"{r['digit']:>5}  {r['images']:>6}  {r['correct']:>7}  {r['accuracy']:>8.4f}  {confused}")
    lines.append(f"{'all':>5}  {images:>6}  {correct:>7}  {correct / images if images else float('nan'):>8.4f}")
    return "\n".join(lines)


def write_per_class_csv(path, rows):
    lines = [",".join(PER_CLASS_COLUMNS)]
    lines += [",".join(f"{r[c]:.6f}" if c == "accuracy" else str(r[c]) for c in PER_CLASS_COLUMNS) for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


# ----------------------------------------------------------------------------- figures

def _new_figure(width, height):
    """A matplotlib Figure on the Agg canvas; ImportError when matplotlib is missing."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path):
    """Render to memory, then write atomically: a reader never sees half a PNG."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _show_digit(ax, image, title=None, fontsize=9):
    ax.imshow(image.reshape(28, 28).numpy(), cmap="gray_r", vmin=0, vmax=255 if image.dtype == torch.uint8 else 1)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize)


def plot_learning_curves(history, path):
    """Loss and accuracy per epoch, train and validation, from the trainer's history rows."""
    from matplotlib.ticker import MaxNLocator
    figure = _new_figure(11, 4.2)
    loss_ax, accuracy_ax = figure.subplots(1, 2)
    epochs = [row["epoch"] for row in history]
    for ax, metric, ylabel in ((loss_ax, "loss", "cross-entropy loss"), (accuracy_ax, "accuracy", "accuracy")):
        # Train numbers are on augmented batches (and the loss label-smoothed): compare shapes, not levels.
        ax.plot(epochs, [row[f"train_{metric}"] for row in history], "o-", ms=3, label="train (augmented batches)")
        ax.plot(epochs, [row[f"val_{metric}"] for row in history], "o-", ms=3, label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{metric} per epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    validated = [row for row in history if not math.isnan(row["val_accuracy"])]
    if validated:
        best = max(reversed(validated), key=lambda row: row["val_accuracy"])  # ties: the later, as for best.pt
        accuracy_ax.plot(best["epoch"], best["val_accuracy"], "*", color="C1", ms=13,
                         label=f"best validation {best['val_accuracy']:.4f} (epoch {best['epoch']})")
    loss_ax.legend()
    accuracy_ax.legend()
    return _save(figure, path)


def plot_confusion_matrix(matrix, path, name="validation"):
    """Counts annotated in every cell: correct ones (the diagonal) in blue, mistakes in red.

    Each part gets its own colour scale, so a handful of errors stands out next to
    hundreds of correct images; no colour bar, the counts are written in the cells.
    """
    classes, total = len(matrix), int(matrix.sum())
    accuracy = int(matrix.diagonal().sum()) / max(total, 1)
    counts = matrix.numpy()
    diagonal = np.eye(classes, dtype=bool)
    figure = _new_figure(6.8, 6.5)
    ax = figure.subplots()
    for part, colours in ((diagonal, "Blues"), (~diagonal, "Reds")):
        scale = max(counts[part].max(), 1)
        ax.imshow(np.where(part & (counts > 0), counts, np.nan), cmap=colours, vmin=0, vmax=scale)  # NaN: white
        for true, predicted in zip(*np.nonzero(part)):
            count = counts[true, predicted]
            ax.text(predicted, true, str(count), ha="center", va="center", fontsize=9,
                    color="white" if count > 0.6 * scale else ("black" if count else "0.75"))
    ax.set_xticks(range(classes))
    ax.set_yticks(range(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{name} confusion matrix: {total:,} images, accuracy {accuracy:.4f}")
    return _save(figure, path)


def plot_worst_errors(images, labels, probabilities, path, count=WORST_ERRORS, name="validation"):
    """The misclassified images the model was most confident about, most confident first."""
    confidences, predictions = probabilities.max(1)
    wrong = torch.nonzero(predictions != labels).flatten()
    worst = wrong[confidences[wrong].argsort(descending=True)][:count]
    confidences, predictions, labels = confidences.tolist(), predictions.tolist(), labels.tolist()
    columns = 6
    rows = max(1, -(-len(worst) // columns))
    figure = _new_figure(columns * 1.7, rows * 1.95 + 0.4)
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for ax, index in zip(axes, worst.tolist()):
        _show_digit(ax, images[index], f"true {labels[index]}  pred {predictions[index]}\n"
                                       f"confidence {confidences[index]:.0%}")
    for ax in axes[len(worst):]:
        ax.axis("off")
    if len(worst) == 0:
        axes[0].text(0, 0.5, f"no misclassified {name} images", fontsize=12)
    figure.suptitle(f"most confident mistakes: {len(worst)} of {len(wrong):,} errors on "
                    f"{len(labels):,} {name} images")
    return _save(figure, path)


def _describe(config: AugmentConfig):
    if not config.enabled:
        return "augmentation off"
    elastic = f"elastic alpha {config.elastic_alpha:g} sigma {config.elastic_sigma:g}" if config.elastic_alpha \
        else "no elastic"
    return (f"rotate ±{config.rotate_deg:g}°, scale ±{config.scale:.0%}, shear ±{config.shear:g}, "
            f"shift ±{config.shift * 28:.1f} px, {elastic}")


def plot_augmentation(images, labels, config: AugmentConfig, path, views=AUGMENTED_VIEWS, seed=0):
    """One training image per digit (top row) and `views` augmented versions of it below."""
    picked = torch.cat([torch.nonzero(labels == digit).flatten()[:1] for digit in range(10)])
    originals = images[picked].float().div(255)
    generator = torch.Generator().manual_seed(seed)
    warped = augment(originals.repeat(views, 1, 1, 1), config, generator).view(views, len(picked), 1, 28, 28)
    figure = _new_figure(len(picked) * 1.1 + 1.0, (views + 1) * 1.15 + 0.5)
    axes = figure.subplots(views + 1, len(picked), squeeze=False)
    for column, index in enumerate(picked.tolist()):
        _show_digit(axes[0, column], originals[column], f"digit {labels[index].item()}", fontsize=10)
        for view in range(views):
            _show_digit(axes[view + 1, column], warped[view, column])
    axes[0, 0].set_ylabel("original")
    for view in range(views):
        axes[view + 1, 0].set_ylabel(f"augmented {view + 1}")
    figure.suptitle(f"training augmentation: {_describe(config)}", fontsize=10)
    return _save(figure, path)


# ----------------------------------------------------------------------------- the report

def write_report(report_dir, dataset: DigitDataset, probabilities, history=None, augment_config=None,
                 train_set=None, name="validation", log=print):
    """Write the report for class `probabilities` (N, classes) of a model on labelled `dataset`.

    Always logs the per-class table and writes per_class_accuracy.csv; draws
    confusion_matrix.png and worst_errors.png, learning_curves.png when `history` (the
    trainer's rows) is given and augmentation.png when `augment_config` is (from
    `train_set`'s images, else `dataset`'s). Without matplotlib the PNGs are skipped
    with one line. Returns {name: path written}.
    """
    images, labels, probabilities = dataset.images.cpu(), dataset.labels.cpu(), probabilities.cpu()
    matrix = confusion_matrix(labels, probabilities.argmax(1), classes=probabilities.shape[1])
    rows = per_class_accuracy(matrix)
    log(f"per-class accuracy on {len(labels):,} {name} images:\n{format_per_class(rows)}")
    paths = {"per_class_accuracy": write_per_class_csv(os.path.join(report_dir, "per_class_accuracy.csv"), rows)}
    try:
        import matplotlib  # noqa: F401  (only to learn whether figures can be drawn)
    except ImportError:
        log(SKIPPED_NO_MATPLOTLIB)
        return paths

    def target(stem):
        return os.path.join(report_dir, f"{stem}.png")

    if history:
        paths["learning_curves"] = plot_learning_curves(history, target("learning_curves"))
    paths["confusion_matrix"] = plot_confusion_matrix(matrix, target("confusion_matrix"), name)
    paths["worst_errors"] = plot_worst_errors(images, labels, probabilities, target("worst_errors"), name=name)
    if augment_config is not None:
        source = train_set if train_set is not None else dataset
        paths["augmentation"] = plot_augmentation(source.images.cpu(), source.labels.cpu(), augment_config,
                                                  target("augmentation"))
    log(f"report: wrote {len(paths)} files to {report_dir}")
    return paths
