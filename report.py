"""Error analysis after training: curves, confusion matrix, mistakes, the test set, one HTML page.

`write_report` turns a labelled dataset and a model's class probabilities on it into a
folder of PNGs and CSVs (per-class accuracy, every mistake with its train.csv line, the
least confident test images) plus `index.html`, which shows all of them on one page with
the run's recipe and headline figures. main.py calls it for the submitted predictor on
the validation split; inference.py for any checkpoint(s) on a labelled CSV. Figures are
drawn with matplotlib's object API on the Agg canvas (no pyplot state, no display
needed), rendered to memory and written atomically. matplotlib is imported only here,
inside the drawing functions, so the suite trains and predicts without it; the CSVs and
index.html are written either way.
"""

import contextlib
import html
import importlib
import io
import math
import os

import numpy as np
import torch

from dataloader import IMAGE_SIDE, AugmentConfig, DigitDataset, augment
from files import Kind, atomic_write_bytes, atomic_write_text, read_head

PER_CLASS_COLUMNS = ["digit", "images", "correct", "accuracy", "most_confused_with", "confused_count"]
MISTAKE_COLUMNS = ["line", "index", "label", "predicted", "predicted_probability", "label_probability",
                   "runner_up", "runner_up_probability"]
UNSURE_COLUMNS = ["ImageId", "predicted", "probability", "runner_up", "runner_up_probability"]
SKIPPED_NO_MATPLOTLIB = ("report figures skipped: matplotlib is not installed (pip install -r requirements.txt); "
                         "the CSVs and index.html are written")
GRID_CELLS = 24  # images in the mistakes and least-confident grids
HTML_ROWS = 50  # rows of a long table shown in index.html; the CSV has them all
AUGMENTED_VIEWS = 4  # augmented versions drawn under each original
DPI = 100


TITLE = "Digit Recognizer report"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PAGE = Kind("a report page", b"<!DOCTYPE html>", (f"<title>{TITLE}".encode(),))
_FIGURE = Kind("a report figure", PNG_SIGNATURE, (b"Source\x00" + TITLE.encode(),))  # _save's PNG text chunk
# Figures from before that mark (matplotlib names itself in every PNG) are taken as ours only
# beside a report page or per-class table of ours: every report, of every version, wrote them.
_EARLIER_FIGURE = Kind("a report figure", PNG_SIGNATURE, (b"Matplotlib",))


def _table(columns):
    return Kind("a report table", (",".join(columns) + "\n").encode())


# file name -> (its Kind or None for a figure, whether only a training run writes it)
REPORT_FILES = {"index.html": (_PAGE, False), "per_class_accuracy.csv": (_table(PER_CLASS_COLUMNS), False),
                "per_class_accuracy.png": (None, False), "mistakes.csv": (_table(MISTAKE_COLUMNS), False),
                "mistakes.png": (None, False), "confusion_matrix.png": (None, False),
                "learning_curves.png": (None, True), "augmentation.png": (None, True),
                "test_predictions.png": (None, True), "least_confident_test.csv": (_table(UNSURE_COLUMNS), True),
                "least_confident_test.png": (None, True)}


def _holds_its_kind(path):
    """Whether `path` is a regular file that a report wrote."""
    with contextlib.suppress(OSError):
        return os.path.isfile(path) and REPORT_FILES[os.path.basename(path)][0].wrote(read_head(path))
    return False


def holds_a_report(report_dir):
    """Whether `report_dir` holds a report page this suite wrote."""
    return _holds_its_kind(os.path.join(report_dir, "index.html"))


def _remove_earlier(report_dir, written):
    """Delete what an earlier report left here and this one did not write (its curves, its test
    set), so the folder holds one report: only files that carry this suite's mark (figures
    without it may be the user's). Returns how many."""
    removed = 0
    for name, (kind, _) in REPORT_FILES.items():
        path = os.path.join(report_dir, name)
        if name in written or os.path.islink(path) or not os.path.isfile(path):
            continue
        with contextlib.suppress(OSError):
            if (kind or _FIGURE).wrote(read_head(path)):
                os.remove(path)
                removed += 1
    return removed


def report_files(report_dir, training_run=True):
    """[(path, Kind)] of every file a report may write into `report_dir` (checked before a run
    starts); a report on a labelled file (inference.py --report) has no curves and no test set."""
    figure = _EARLIER_FIGURE if any(_holds_its_kind(os.path.join(report_dir, name))
                                    for name in ("index.html", "per_class_accuracy.csv")) else _FIGURE
    return [(os.path.join(report_dir, name), kind or figure) for name, (kind, training_only) in REPORT_FILES.items()
            if training_run or not training_only]


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


def _top_two(probabilities):
    """(p1, class1, p2, class2) as lists: the most and second most probable class of each row."""
    values, classes = probabilities.topk(2, dim=1)
    return values[:, 0].tolist(), classes[:, 0].tolist(), values[:, 1].tolist(), classes[:, 1].tolist()


def mistake_rows(labels, probabilities, line_numbers=None):
    """Every misclassified image (MISTAKE_COLUMNS), the most confidently wrong first.

    `line` is the image's line in its CSV (blank when `line_numbers` is not given),
    `index` its position in the reported dataset; the runner-up is the second choice.
    """
    p1, c1, p2, c2 = _top_two(probabilities)
    wrong = torch.nonzero(probabilities.argmax(1) != labels).flatten()
    wrong = wrong[probabilities[wrong].max(1).values.argsort(descending=True, stable=True)].tolist()
    lines = torch.as_tensor(line_numbers).tolist() if line_numbers is not None else None
    labels = labels.tolist()
    return [{"line": lines[i] if lines else "", "index": i, "label": labels[i], "predicted": c1[i],
             "predicted_probability": p1[i], "label_probability": probabilities[i, labels[i]].item(),
             "runner_up": c2[i], "runner_up_probability": p2[i]} for i in wrong]


def least_confident_rows(probabilities, count):
    """The `count` test images with the lowest top probability (UNSURE_COLUMNS), least sure first."""
    p1, c1, p2, c2 = _top_two(probabilities)
    order = probabilities.max(1).values.argsort(stable=True)[:count].tolist()
    return [{"ImageId": i + 1, "predicted": c1[i], "probability": p1[i], "runner_up": c2[i],
             "runner_up_probability": p2[i]} for i in order]  # ImageId: the submission's, from 1


def _csv_value(value):
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def write_csv_rows(path, columns, rows):
    lines = [",".join(columns)] + [",".join(_csv_value(row[c]) for c in columns) for row in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def write_per_class_csv(path, rows):
    return write_csv_rows(path, PER_CLASS_COLUMNS, rows)


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
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Source": TITLE})  # how report_files knows it
    atomic_write_bytes(path, buffer.getvalue())
    return path


TILE_GAP = 3  # image pixels between two digit tiles (a tile is 28)
SUPTITLE_INCHES = 0.4


def _tile_figure(images, corners, width, height, inches_per_pixel, left=0):
    """(figure, axes) showing `images` (each 28x28, uint8 or [0, 1]) as framed tiles with their
    top-left corners at `corners` [(x, y)], in image pixels of a `width` x `height` canvas (y
    pointing down), with `left` more pixels for row labels. The figure is sized so each image
    pixel is `inches_per_pixel` wide, plus room for a suptitle. The tiles are one image on one
    axes: an axes per digit made a report's grids 3x slower to draw."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle
    canvas = np.full((height, width), np.nan)  # NaN: the gaps, drawn white
    for image, (x, y) in zip(images, corners, strict=True):
        scale = 255 if image.dtype == torch.uint8 else 1
        canvas[y:y + IMAGE_SIDE, x:x + IMAGE_SIDE] = image.reshape(IMAGE_SIDE, IMAGE_SIDE).float().numpy() / scale
    figure = _new_figure((width + left + 2) * inches_per_pixel, (height + 2) * inches_per_pixel + SUPTITLE_INCHES)
    ax = figure.subplots()
    ax.imshow(canvas, cmap="gray_r", vmin=0, vmax=1, interpolation="nearest", extent=(0, width, height, 0))
    ax.add_collection(PatchCollection([Rectangle(corner, IMAGE_SIDE, IMAGE_SIDE) for corner in corners],
                                      facecolor="none", edgecolor="black", linewidth=0.8))
    ax.set_xlim(-1 - left, width + 1)  # 1 pixel of margin keeps the frames whole
    ax.set_ylim(height + 1, -1)
    ax.axis("off")
    return figure, ax


def _percent(p):
    """A probability as a short percentage that never rounds a small one to 0%."""
    return f"{p:.0%}" if p >= 0.01 else (f"{p:.1%}" if p >= 0.001 else "<0.1%")


def plot_learning_curves(history, path):
    """Loss, accuracy and learning rate per epoch, from the trainer's history rows."""
    from matplotlib.ticker import MaxNLocator
    figure = _new_figure(15, 4.2)
    loss_ax, accuracy_ax, lr_ax = figure.subplots(1, 3)
    epochs = [row["epoch"] for row in history]
    # Train numbers are on augmented batches and the train loss is label-smoothed (its floor
    # is above 0): compare shapes, not levels.
    for ax, metric, ylabel, train_label in (
            (loss_ax, "loss", "cross-entropy loss", "train (label-smoothed, augmented batches)"),
            (accuracy_ax, "accuracy", "accuracy", "train (augmented batches)")):
        ax.plot(epochs, [row[f"train_{metric}"] for row in history], "o-", ms=3, label=train_label)
        ax.plot(epochs, [row[f"val_{metric}"] for row in history], "o-", ms=3, label="validation")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{metric} per epoch")
    lr_ax.plot(epochs, [row["lr"] for row in history], "o-", ms=3, color="C2")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_title("learning rate of each epoch's last step")
    for ax in (loss_ax, accuracy_ax, lr_ax):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    validated = [row for row in history if not math.isnan(row["val_accuracy"])]
    if validated:
        best = max(reversed(validated), key=lambda row: row["val_accuracy"])  # ties: the later, as --best-epoch
        accuracy_ax.plot(best["epoch"], best["val_accuracy"], "*", color="C1", ms=13,
                         label=f"highest validation {best['val_accuracy']:.4f} (epoch {best['epoch']}), for reference")
    loss_ax.legend()
    accuracy_ax.legend()
    return _save(figure, path)


def plot_confusion_matrix(matrix, path, name="validation"):
    """Row-normalised: each cell is the share of a true digit's images given that prediction.

    The colour scale is logarithmic, so a 0.2% confusion is visible next to 99% on the
    diagonal; each non-empty cell also shows its share and its count.
    """
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import FuncFormatter
    classes, total = len(matrix), int(matrix.sum())
    accuracy = int(matrix.diagonal().sum()) / max(total, 1)
    counts = matrix.numpy()
    shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    figure = _new_figure(7.6, 6.5)
    ax = figure.subplots()
    floor = 1e-3
    image = ax.imshow(np.where(counts > 0, np.maximum(shares, floor), np.nan), cmap="viridis",
                      norm=LogNorm(vmin=floor, vmax=1))  # NaN (no images): white
    figure.colorbar(image, ax=ax, label="share of the true digit's images (log scale)",
                    format=FuncFormatter(lambda value, _: f"{value:.1%}" if value < 0.01 else f"{value:.0%}"))
    for true, predicted in zip(*np.nonzero(counts)):
        share = shares[true, predicted]  # one decimal: 415 of 416 reads 99.8%, not 100%
        ax.text(predicted, true, f"{share:.1%}\n{counts[true, predicted]}", ha="center", va="center",
                fontsize=7, color="black" if share > 0.3 else "white")
    ax.set_xticks(range(classes))
    ax.set_yticks(range(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{name} confusion matrix, row-normalised: {total:,} images, accuracy {accuracy:.4f}", fontsize=10)
    return _save(figure, path)


def plot_per_class_accuracy(rows, path, name="validation"):
    """Accuracy of each true digit, zoomed to the range the digits span, with the overall line."""
    figure = _new_figure(8, 4.2)
    ax = figure.subplots()
    digits = [r["digit"] for r in rows]
    shown = [r for r in rows if r["images"]]  # a digit with no images has no accuracy: no bar, not a 0
    accuracies = [r["correct"] / r["images"] for r in shown]
    images, correct = sum(r["images"] for r in rows), sum(r["correct"] for r in rows)
    overall = correct / max(images, 1)
    bars = ax.bar([r["digit"] for r in shown], accuracies, color=["C3" if a < overall else "C0" for a in accuracies])
    ax.bar_label(bars, [f"{a:.3f}\n{r['images'] - r['correct']} wrong" for a, r in zip(accuracies, shown)], fontsize=8)
    ax.axhline(overall, color="0.3", ls="--", lw=1)
    low = min(accuracies + [overall])
    ax.set_ylim(max(0.0, low - (1 - low) * 0.6 - 0.002), 1.0 + (1 - low) * 0.35 + 0.001)  # room for the labels
    for r in rows:
        if not r["images"]:
            ax.text(r["digit"], ax.get_ylim()[0], "no\nimages", ha="center", va="bottom", fontsize=8, color="0.4")
    ax.set_yticks([tick for tick in ax.get_yticks() if tick <= 1])
    ax.set_xticks(digits)
    ax.set_xlabel("true digit")
    ax.set_ylabel("accuracy")
    ax.set_title(f"per-class accuracy on {images:,} {name} images; dashed: all digits {overall:.4f}, "
                 f"red: below it", fontsize=10)
    return _save(figure, path)


def _digit_grid(images, titles, path, title, empty_text, columns=6):
    """A grid of digits with a two-line title over each; `empty_text` when there are none."""
    rows = max(1, -(-len(titles) // columns))
    title_room = 9  # image pixels: two lines of 8 pt text
    pitch_x, pitch_y = IMAGE_SIDE + TILE_GAP, title_room + IMAGE_SIDE + TILE_GAP
    corners = [((i % columns) * pitch_x, (i // columns) * pitch_y + title_room) for i in range(len(titles))]
    figure, ax = _tile_figure(images, corners, columns * pitch_x - TILE_GAP, rows * pitch_y - TILE_GAP,
                              1.85 / pitch_x)
    for (x, y), cell_title in zip(corners, titles):
        ax.text(x + IMAGE_SIDE / 2, y - 1, cell_title, ha="center", va="bottom", fontsize=8)
    if not titles:
        ax.text(0, pitch_y / 2, empty_text, fontsize=12)
    figure.suptitle(title)
    return _save(figure, path)


def plot_mistakes(images, mistakes, total, path, name="validation"):
    """The most confidently wrong images: CSV line, true digit's probability, prediction, runner-up."""
    shown = mistakes[:GRID_CELLS]
    titles = [(f"line {m['line']}" if m["line"] != "" else f"#{m['index']}") +
              f"  true {m['label']}: {_percent(m['label_probability'])}\n"
              f"pred {m['predicted']}: {_percent(m['predicted_probability'])}, "
              f"2nd {m['runner_up']}: {_percent(m['runner_up_probability'])}" for m in shown]
    return _digit_grid([images[m["index"]] for m in shown], titles, path,
                       f"most confident mistakes: {len(shown)} of {len(mistakes):,} errors on {total:,} {name} "
                       f"images (all in mistakes.csv)", f"no misclassified {name} images")


def plot_least_confident(images, unsure, path):
    """The test images the model is least sure about: ImageId, top choice and runner-up."""
    shown = unsure[:GRID_CELLS]
    titles = [f"ImageId {u['ImageId']}\n{u['predicted']}: {_percent(u['probability'])}, "
              f"{u['runner_up']}: {_percent(u['runner_up_probability'])}" for u in shown]
    return _digit_grid([images[u["ImageId"] - 1] for u in shown], titles, path,
                       f"least confident test images: top choice and runner-up ({len(images):,} images)",
                       "no test images")


def plot_test_predictions(test_probabilities, labels, path, name="validation"):
    """How the test set's predictions spread over the digits, beside the labelled set's true shares."""
    classes = test_probabilities.shape[1]
    predicted = torch.bincount(test_probabilities.argmax(1), minlength=classes)
    true = torch.bincount(labels, minlength=classes)
    figure = _new_figure(8, 4.2)
    ax = figure.subplots()
    shares = (predicted / max(int(predicted.sum()), 1)).tolist()
    bars = ax.bar(range(classes), shares, color="C0", label=f"test: predicted digit ({int(predicted.sum()):,} images)")
    ax.bar_label(bars, [f"{n:,}" for n in predicted.tolist()], label_type="center", color="white", fontsize=8)
    ax.plot(range(classes), (true / max(int(true.sum()), 1)).tolist(), "D", color="C1",
            label=f"{name}: true digit ({int(true.sum()):,} images)")
    ax.set_ylim(0, max(shares + [0.1]) * 1.3)  # room for the legend
    ax.set_xticks(range(classes))
    ax.set_xlabel("digit")
    ax.set_ylabel("share of images")
    ax.set_title("test set: predicted-class distribution")
    ax.legend(loc="upper center", ncols=2)
    return _save(figure, path)


def _describe(config: AugmentConfig):
    if not config.enabled:
        return "augmentation off"
    elastic = f"elastic alpha {config.elastic_alpha:g} sigma {config.elastic_sigma:g}" if config.elastic_alpha \
        else "no elastic"
    return (f"rotate ±{config.rotate_deg:g}°, scale ±{config.scale:.0%}, shear ±{config.shear:g}, "
            f"shift ±{config.shift * IMAGE_SIDE:.1f} px, {elastic}")


def plot_augmentation(images, labels, config: AugmentConfig, path, views=AUGMENTED_VIEWS, seed=0):
    """One training image per digit (top row) and `views` augmented versions of it below."""
    picked = torch.cat([torch.nonzero(labels == digit).flatten()[:1] for digit in range(10)])
    originals = images[picked].float().div(255)
    generator = torch.Generator().manual_seed(seed)
    warped = augment(originals.repeat(views, 1, 1, 1), config, generator)  # (views * 10, 1, 28, 28)
    warped = warped.view(views, len(picked), 1, IMAGE_SIDE, IMAGE_SIDE)
    pitch, title_room, label_room = IMAGE_SIDE + TILE_GAP, 7, 8  # image pixels: a line of 10 pt text
    rows = [originals, *warped]  # views + 1 rows of len(picked) images
    corners = [(column * pitch, title_room + row * pitch) for row in range(len(rows)) for column in range(len(picked))]
    figure, ax = _tile_figure([image for row in rows for image in row], corners, len(picked) * pitch - TILE_GAP,
                              title_room + len(rows) * pitch - TILE_GAP, 1.1 / pitch, left=label_room)
    for (x, y), index in zip(corners, picked.tolist()):
        ax.text(x + IMAGE_SIDE / 2, y - 1, f"digit {labels[index].item()}", ha="center", va="bottom", fontsize=10)
    for row, label in enumerate(["original", *(f"augmented {view + 1}" for view in range(views))]):
        ax.text(-2, title_room + row * pitch + IMAGE_SIDE / 2, label, rotation=90, ha="right", va="center",
                fontsize=10)
    figure.suptitle(f"training augmentation: {_describe(config)}", fontsize=10)
    return _save(figure, path)


# ----------------------------------------------------------------------------- index.html

# On load, each picture that did not load is marked (a visible note for the reader) and the
# body records how many did, which the headless-browser test reads back from the DOM.
_CHECK_IMAGES = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  for (const img of images) {
    img.dataset.naturalWidth = img.naturalWidth;
    if (img.naturalWidth) continue;
    const note = document.createElement("p");
    note.className = "missing";
    note.textContent = "missing picture: " + img.alt;
    img.after(note);
  }
  document.body.dataset.imagesLoaded = `${images.filter(img => img.naturalWidth > 0).length}/${images.length}`;
});
</script>"""
_STYLE = """<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1500px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; min-width: 0; max-width: 100%; } img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; } .missing { color: #b00; font-weight: bold; }
.tables, .row { display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }
</style>"""


def _html_value(value):
    if isinstance(value, float):  # integers as they are: a line number must read as in the file
        return "nan" if math.isnan(value) else (f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}")
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def html_table(columns, rows, caption=None):
    """An HTML table of dict rows; every header and cell escaped."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_html_value(row[c]))}</td>" for c in columns) + "</tr>"
                   for row in rows)
    caption = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _key_value_table(values, caption):
    return html_table(["", "value"], [{"": k, "value": v} for k, v in values.items()], caption)


def _figure(file_name, caption):
    return (f'<figure><img src="{html.escape(file_name)}" alt="{html.escape(file_name)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _link(file_name):
    return f'<a href="{html.escape(file_name)}">{html.escape(file_name)}</a>'


def render_index_html(title, summary, recipe, sections, files):
    """The page: headline figures and recipe side by side, then each (heading, [html parts]) section."""
    parts = [f"<h1>{html.escape(title)}</h1>", '<div class="tables">',
             _key_value_table(summary, "figures"),
             # settings as given: 0.1, not 0.1000
             _key_value_table({k: f"{v:g}" if isinstance(v, float) else v for k, v in recipe.items()}, "recipe")
             if recipe else "", "</div>"]
    for heading, content in sections:
        parts += [f"<h2>{html.escape(heading)}</h2>", *content]
    parts += ["<h2>files</h2><p>" + " · ".join(_link(f) for f in files) + "</p>"]
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title>{_STYLE}</head>\n<body>\n" + "\n".join(parts) +
            f"\n{_CHECK_IMAGES}\n</body></html>\n")
    # A file name that is not UTF-8 (kept as surrogates) shows as U+FFFD: the page stays UTF-8, as it says.
    return page.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# ----------------------------------------------------------------------------- the report

FIGURE_CAPTIONS = {  # file name -> caption, in page order
    "learning_curves.png": "loss, accuracy and learning rate per epoch of the last model trained",
    "augmentation.png": "what the training batches look like",
    "confusion_matrix.png": "row-normalised: share of each true digit's images per prediction (log colour)",
    "per_class_accuracy.png": "accuracy of each true digit",
    "mistakes.png": "the most confident mistakes, with the true digit's probability and the runner-up",
    "test_predictions.png": "how many test images go to each digit, beside the true shares of the labelled set",
    "least_confident_test.png": "the test images the model is least sure about (ImageId as in the submission)",
}


def _plain_title(text):
    """`text` (e.g. an input's file name) as matplotlib draws it literally: '$' would start
    math notation, and bytes that are not UTF-8 (kept as surrogates) cannot be drawn."""
    return text.encode("utf-8", "replace").decode("utf-8").replace("$", r"\$")


def _draw_figures(target, dataset, name, matrix, rows, mistakes, history, augment_config, train_set, test, log):
    """Every figure the inputs allow: {file name: path}; {} (with a log line) without matplotlib."""
    try:
        importlib.import_module("matplotlib")  # only to learn whether figures can be drawn
    except ImportError:
        log(SKIPPED_NO_MATPLOTLIB)
        return {}
    name = _plain_title(name)
    images, labels = dataset.images.cpu(), dataset.labels.cpu()
    test_images, test_probabilities, unsure = test
    figures = {}
    if history:
        figures["learning_curves.png"] = plot_learning_curves(history, target("learning_curves.png"))
    figures["confusion_matrix.png"] = plot_confusion_matrix(matrix, target("confusion_matrix.png"), name)
    figures["per_class_accuracy.png"] = plot_per_class_accuracy(rows, target("per_class_accuracy.png"), name)
    figures["mistakes.png"] = plot_mistakes(images, mistakes, len(labels), target("mistakes.png"), name)
    if test_probabilities is not None:
        figures["test_predictions.png"] = plot_test_predictions(test_probabilities, labels,
                                                                target("test_predictions.png"), name)
        if test_images is not None:
            figures["least_confident_test.png"] = plot_least_confident(test_images.cpu(), unsure,
                                                                       target("least_confident_test.png"))
    if augment_config is not None:
        source = train_set if train_set is not None else dataset
        figures["augmentation.png"] = plot_augmentation(source.images.cpu(), source.labels.cpu(), augment_config,
                                                        target("augmentation.png"))
    return figures


def _index_sections(name, figures, rows, mistakes, unsure, history, n_images, n_test, lines_in):
    """[(heading, [html blocks])] of index.html, empty sections dropped."""
    def pictures(*names):
        shown = [_figure(n, f"{n}: {FIGURE_CAPTIONS[n]}") for n in names if n in figures]
        return [f'<div class="row">{"".join(shown)}</div>'] if shown else []

    where = f"{lines_in} line (header = line 1)" if lines_in else "position in the reported file"
    sections = [
        ("training", pictures("learning_curves.png", "augmentation.png")),
        (f"{name}: where the model fails",
         pictures("confusion_matrix.png", "per_class_accuracy.png") +
         [html_table(PER_CLASS_COLUMNS, rows, f"per-class accuracy on {n_images:,} {name} images")]),
        (f"{name}: mistakes",
         pictures("mistakes.png") +
         [html_table(MISTAKE_COLUMNS, mistakes[:HTML_ROWS],
                     f"the {min(len(mistakes), HTML_ROWS)} most confident of {len(mistakes):,} mistakes "
                     f"(line: {where}); all in mistakes.csv")]),
    ]
    if n_test is not None:
        sections.append((f"test set: {n_test:,} images",
                         pictures("test_predictions.png", "least_confident_test.png") +
                         [html_table(UNSURE_COLUMNS, unsure, f"the {len(unsure)} least confident test images")]))
    if history:
        sections.append(("history", [html_table(list(history[0]), history,
                                                "one row per epoch of the last model trained")]))
    if not figures:
        sections.insert(0, ("figures", [f"<p>{html.escape(SKIPPED_NO_MATPLOTLIB)}</p>"]))
    return [(heading, blocks) for heading, blocks in sections if blocks]


def write_report(report_dir, dataset: DigitDataset, probabilities, history=None, augment_config=None,
                 train_set=None, name="validation", log=print, *, line_numbers=None, lines_in="train.csv",
                 test_images=None, test_probabilities=None, recipe=None, summary=None):
    """Write the report for class `probabilities` (N, classes) of a model on labelled `dataset`.

    Always logs the per-class table and writes per_class_accuracy.csv, mistakes.csv (every
    error; `line_numbers` (N,) gives each image's line in the CSV `lines_in`, header = line 1) and
    index.html (every picture and table on one page, with `recipe` and `summary`: plain
    dicts of the run's settings and headline figures). Draws confusion_matrix.png,
    per_class_accuracy.png and mistakes.png; learning_curves.png when `history` (the
    trainer's rows) is given; augmentation.png when `augment_config` is (from `train_set`'s
    images, else `dataset`'s). With `test_probabilities` (N_test, classes): the
    predicted-class distribution (test_predictions.png) and least_confident_test.csv, and
    with `test_images` (N_test, 1, 28, 28) too, least_confident_test.png. Without matplotlib
    the PNGs are skipped with one line. An earlier report's files that this one does not
    write are removed. Returns {file name: path written}.
    """
    labels, probabilities = dataset.labels.cpu(), probabilities.cpu()
    matrix = confusion_matrix(labels, probabilities.argmax(1), classes=probabilities.shape[1])
    rows = per_class_accuracy(matrix)
    mistakes = mistake_rows(labels, probabilities, line_numbers)
    log(f"per-class accuracy on {len(labels):,} {name} images:\n{format_per_class(rows)}")

    def target(file_name):
        return os.path.join(report_dir, file_name)

    write_unfinished_page(target("index.html"))
    paths = {"per_class_accuracy.csv": write_per_class_csv(target("per_class_accuracy.csv"), rows),
             "mistakes.csv": write_csv_rows(target("mistakes.csv"), MISTAKE_COLUMNS, mistakes)}
    unsure = []
    if test_probabilities is not None:
        test_probabilities = test_probabilities.cpu()
        unsure = least_confident_rows(test_probabilities, HTML_ROWS)
        paths["least_confident_test.csv"] = write_csv_rows(target("least_confident_test.csv"), UNSURE_COLUMNS, unsure)
    figures = _draw_figures(target, dataset, name, matrix, rows, mistakes, history, augment_config, train_set,
                            (test_images, test_probabilities, unsure), log)
    paths.update(figures)
    sections = _index_sections(name, figures, rows, mistakes, unsure, history, len(labels),
                               None if test_probabilities is None else len(test_probabilities),
                               lines_in if line_numbers is not None else None)
    summary = {f"{name} accuracy": 1 - len(mistakes) / max(len(labels), 1), f"{name} images": len(labels),
               "mistakes": len(mistakes), **(summary or {})}
    page = render_index_html(f"{TITLE}: {name}", summary, recipe or {}, sections, list(paths))
    removed = _remove_earlier(report_dir, [*paths, "index.html"])
    paths["index.html"] = target("index.html")
    atomic_write_text(paths["index.html"], page)
    log(f"report: wrote {len(paths)} files to {report_dir}"
        f"{f', removed {removed} of an earlier report' if removed else ''} (open {paths['index.html']})")
    return paths


def write_unfinished_page(path):
    """index.html goes last; until then it says so, so a report cut short never shows an
    earlier run's page over this run's files."""
    atomic_write_text(path, render_index_html(f"{TITLE}: being written", {}, {}, [
        ("unfinished", ["<p>This report is being written. If this page stays, its run was stopped: run it "
                        "again.</p>"])], []))
