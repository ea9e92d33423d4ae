"""The report (plots, CSVs, index.html in a real browser), history.csv, progress control, --probs."""

import os
import re
import shutil
import stat
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import inference
import main as main_module
import report
from DigitRecognizerModel import DigitRecognizerModel, ModelConfig, save_checkpoint
from conftest import make_digits, small_recipe, write_csv
from dataloader import AugmentConfig, DigitDataset
from trainer import HISTORY_COLUMNS, evaluate, train

CPU = torch.device("cpu")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNGS = {"learning_curves.png", "confusion_matrix.png", "per_class_accuracy.png", "mistakes.png", "augmentation.png"}
TEST_SET_FILES = {"test_predictions.png", "least_confident_test.png", "least_confident_test.csv"}
TABLES = {"per_class_accuracy.csv", "mistakes.csv", "index.html"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _tiny_model():
    torch.manual_seed(0)
    return DigitRecognizerModel(ModelConfig(widths=(4, 8, 8)))


def _history(epochs=3):
    return [{"epoch": e, "train_loss": 1.0 / e, "train_accuracy": 1 - 0.3 / e, "val_loss": 0.8 / e,
             "val_accuracy": 1 - 0.2 / e, "lr": 0.1, "seconds": 1.0} for e in range(1, epochs + 1)]


@pytest.fixture
def split():
    images, labels = make_digits(140)
    return DigitDataset(images[:100], labels[:100]), DigitDataset(images[100:], labels[100:])


@pytest.fixture
def checkpoint(tmp_path):
    path = str(tmp_path / "model.pt")
    save_checkpoint(path, _tiny_model())
    return path


def _assert_png(path):
    from matplotlib.image import imread
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    image = imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) >= 200  # big enough to read


# ----------------------------------------------------------------------------- numbers

def test_confusion_matrix_counts(split):
    matrix = report.confusion_matrix(torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 2, 0, 2]), classes=3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]

    _, val_set = split
    model = _tiny_model()
    probabilities = inference.predict_probs([model], val_set.images, CPU)
    assert probabilities.shape == (len(val_set), 10)
    matrix = report.confusion_matrix(val_set.labels, probabilities.argmax(1))
    assert matrix.shape == (10, 10) and int(matrix.sum()) == len(val_set)
    assert int(matrix.diagonal().sum()) / len(val_set) == pytest.approx(evaluate(model, val_set, CPU)["accuracy"])


def test_per_class_accuracy_rows():
    rows = report.per_class_accuracy(torch.tensor([[3, 1, 0], [0, 2, 0], [2, 0, 0]]))
    assert [r["accuracy"] for r in rows[:2]] == [0.75, 1.0]
    assert (rows[0]["most_confused_with"], rows[0]["confused_count"]) == (1, 1)
    assert (rows[1]["most_confused_with"], rows[1]["confused_count"]) == ("", 0)
    assert rows[2]["accuracy"] == 0.0 and rows[2]["most_confused_with"] == 0


# ----------------------------------------------------------------------------- trainer

def test_history_csv_one_row_per_epoch_across_resume(tmp_path, split, capsys):
    train_set, val_set = split
    config = small_recipe(epochs=2, batch_size=32)

    def interrupt_after_first_epoch(message):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_tiny_model(), train_set, val_set, config, CPU, tmp_path, log=interrupt_after_first_epoch)
    history_path = tmp_path / "history.csv"
    first = pd.read_csv(history_path)
    assert list(first.columns) == HISTORY_COLUMNS and first["epoch"].tolist() == [1]

    lines = []
    history = train(_tiny_model(), train_set, val_set, config, CPU, tmp_path, resume=True, log=lines.append)
    resumed = pd.read_csv(history_path)
    assert list(resumed.columns) == HISTORY_COLUMNS and resumed["epoch"].tolist() == [1, 2]
    pd.testing.assert_frame_equal(resumed.iloc[:1], first)  # epoch 1 kept as it was, not re-run
    assert [row["epoch"] for row in history] == [1, 2]
    assert lines[0].startswith("resumed from") and re.match(r"epoch +2/2 .* img/s$", lines[1])
    assert capsys.readouterr().err == ""  # stderr is no terminal here: no progress bars


# ----------------------------------------------------------------------------- report

MISTAKES = {5: 0.8, 30: 0.7, 12: 0.6}  # validation index -> confidence of its wrong prediction
RECIPE = {"preset": "fast", "lr": 0.1, "widths": (16, 32, 128), "data": "<script>alert(1)</script>"}  # to escape


def _probabilities_with_mistakes(labels):
    """Right and 91% sure on every image except MISTAKES: wrong (label + 1), the label runner-up."""
    probabilities = torch.full((len(labels), 10), 0.01)
    probabilities[torch.arange(len(labels)), labels] = 0.91
    for index, confidence in MISTAKES.items():
        probabilities[index] = (1 - confidence - 0.1) / 9
        probabilities[index, (labels[index] + 1) % 10] = confidence
        probabilities[index, labels[index]] = 0.1 + (1 - confidence - 0.1) / 9
    return probabilities


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    """A report with every part (history, augmentation, line numbers, test set, recipe), drawn once."""
    images, labels = make_digits(140)
    train_set, val_set = DigitDataset(images[:100], labels[:100]), DigitDataset(images[100:], labels[100:])
    test_images = make_digits(60, seed=3)[0]
    test_probabilities = torch.rand(60, 10, generator=torch.Generator().manual_seed(0)).pow(4).softmax(1)
    folder, lines = tmp_path_factory.mktemp("report"), []
    paths = report.write_report(folder, val_set, _probabilities_with_mistakes(val_set.labels), history=_history(),
                                augment_config=AugmentConfig(), train_set=train_set, log=lines.append,
                                line_numbers=torch.arange(30000, 30040) + 2, test_images=test_images,
                                test_probabilities=test_probabilities, recipe=RECIPE,
                                summary={"wall time (s)": 61.0})
    return {"folder": folder, "paths": paths, "lines": lines, "val_set": val_set,
            "test_probabilities": test_probabilities}


def test_write_report_writes_every_picture_and_table(full_report):
    paths, folder = full_report["paths"], full_report["folder"]
    assert set(paths) == PNGS | TEST_SET_FILES | TABLES
    assert sorted(os.listdir(folder)) == sorted(paths)  # atomic writes left no temp files
    for name in paths:
        assert paths[name] == os.path.join(folder, name)
        if name.endswith(".png"):
            _assert_png(paths[name])
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(paths["confusion_matrix.png"]).st_mode) == 0o666 & ~umask  # not mkstemp's 0600

    table = pd.read_csv(paths["per_class_accuracy.csv"])
    assert list(table.columns) == report.PER_CLASS_COLUMNS
    assert table["digit"].tolist() == list(range(10)) and table["images"].sum() == 40
    assert full_report["lines"][0].startswith("per-class accuracy on 40 validation images")


def test_mistakes_csv_names_train_csv_lines_and_runner_up(full_report):
    mistakes = pd.read_csv(full_report["paths"]["mistakes.csv"])
    labels = full_report["val_set"].labels
    assert list(mistakes.columns) == report.MISTAKE_COLUMNS
    assert mistakes["index"].tolist() == [5, 30, 12]  # most confidently wrong first
    assert mistakes["line"].tolist() == [30007, 30032, 30014]  # as if validation image i were train.csv row 30000 + i
    assert mistakes["label"].tolist() == labels[[5, 30, 12]].tolist()
    assert mistakes["predicted"].tolist() == ((labels[[5, 30, 12]] + 1) % 10).tolist()
    np.testing.assert_allclose(mistakes["predicted_probability"], [0.8, 0.7, 0.6], atol=1e-6)
    assert mistakes["runner_up"].tolist() == mistakes["label"].tolist()
    np.testing.assert_allclose(mistakes["label_probability"], mistakes["runner_up_probability"], atol=1e-6)
    np.testing.assert_allclose(mistakes["label_probability"], [0.1 + 0.1 / 9, 0.1 + 0.2 / 9, 0.1 + 0.3 / 9], atol=1e-6)


def test_least_confident_test_images(full_report):
    unsure = pd.read_csv(full_report["paths"]["least_confident_test.csv"])
    top = full_report["test_probabilities"].max(1).values
    assert list(unsure.columns) == report.UNSURE_COLUMNS and len(unsure) == report.HTML_ROWS
    assert unsure["ImageId"].tolist() == (top.argsort()[:report.HTML_ROWS] + 1).tolist()  # ImageId counts from 1
    np.testing.assert_allclose(unsure["probability"], top.sort().values[:report.HTML_ROWS], atol=1e-6)
    assert (unsure["runner_up"] != unsure["predicted"]).all()
    assert (unsure["runner_up_probability"] <= unsure["probability"]).all()


def test_index_html_shows_every_picture_and_table_escaped(full_report):
    paths, folder = full_report["paths"], full_report["folder"]
    with open(paths["index.html"], encoding="utf-8") as f:
        page = f.read()
    assert sorted(re.findall(r'<img src="([^"]+)"', page)) == sorted(PNGS | {"test_predictions.png",
                                                                            "least_confident_test.png"})
    assert str(folder) not in page  # relative links: the folder can be moved or zipped
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<td>widths</td><td>16 32 128</td>" in page and "<td>lr</td><td>0.1</td>" in page
    assert "<td>wall time (s)</td><td>61.0</td>" in page
    assert "<td>validation accuracy</td><td>0.9250</td>" in page  # 3 mistakes in 40
    for line in (30007, 30032, 30014):
        assert f"<td>{line}</td>" in page  # the mistakes table: line numbers as in the file, no "30,007"
    assert page.count("<tr><td>") >= 10 + 3 + report.HTML_ROWS + 3  # per-class, mistakes, test, history rows
    for name in paths:
        assert f'<a href="{name}">' in page or name == "index.html"


def _chromium(tmp_path, *args):
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_index_html_renders_in_headless_chromium_with_every_image_loaded(full_report, tmp_path):
    # The page's own script marks each <img> with its naturalWidth once loaded; a virtual
    # time budget lets the load event fire before the DOM is dumped.
    def render(folder):
        return _chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", f"file://{folder}/index.html")

    dom = render(full_report["folder"])
    widths = [int(w) for w in re.findall(r'<img [^>]*data-natural-width="(\d+)"', dom)]
    assert len(widths) == 7 and min(widths) >= 200
    assert 'data-images-loaded="7/7"' in dom and '<p class="missing">' not in dom

    broken = tmp_path / "broken"
    shutil.copytree(full_report["folder"], broken)
    os.remove(broken / "mistakes.png")
    dom = render(broken)  # the same check sees a picture that did not load
    assert 'data-images-loaded="6/7"' in dom and '<p class="missing">missing picture: mistakes.png</p>' in dom


def _rgb(path):
    from matplotlib.image import imread
    return imread(path)[..., :3]


def _dark_pixels(path):
    return int((_rgb(path).mean(-1) < 0.2).sum())


def test_digit_grids_draw_every_image_in_a_tile_of_its_own(tmp_path):
    """The grids are one picture of tiles: each image must land in a tile of its own, so k
    all-ink digits darken k times the area of one (titles and frames are thin)."""
    def mistakes_picture(images, name):
        mistakes = [{"index": i, "line": i + 2, "label": 0, "label_probability": 0.1, "predicted": 1,
                     "predicted_probability": 0.8, "runner_up": 0, "runner_up_probability": 0.1}
                    for i in range(len(images))]
        return report.plot_mistakes(images, mistakes, len(images), str(tmp_path / name))

    def ink(count, value):
        return _dark_pixels(mistakes_picture(torch.full((count, 1, 28, 28), value, dtype=torch.uint8), "m.png"))

    one, four = ink(1, 255) - ink(1, 0), ink(4, 255) - ink(4, 0)
    assert one > 150 ** 2  # a tile is about 165 px square at 100 dpi
    assert 3.9 < four / one < 4.1

    # A uint8 image (0-255) and the same image as floats in [0, 1] look the same.
    grey = (torch.arange(784) % 256).to(torch.uint8).view(1, 1, 28, 28)  # every grey level
    pictures = [mistakes_picture(images, f"{kind}.png") for kind, images in
                (("uint8", grey), ("float", grey.float() / 255))]
    assert np.array_equal(*(_rgb(path) for path in pictures))

    # The augmentation picture: one row of originals, then one row per augmented view.
    digits = torch.full((10, 1, 28, 28), 255, dtype=torch.uint8), torch.arange(10)
    rows = {views: _dark_pixels(report.plot_augmentation(*digits, AugmentConfig(shift=0.01), str(tmp_path / "a.png"),
                                                         views=views)) for views in (1, 3)}
    assert 1.9 < rows[3] / rows[1] < 2.1  # 4 rows of 10 tiles against 2


def test_write_report_without_history_or_augmentation(tmp_path, split):
    _, val_set = split
    perfect = torch.nn.functional.one_hot(val_set.labels, 10).float()  # no errors to show: still a valid PNG
    paths = report.write_report(tmp_path, val_set, perfect, log=lambda message: None)
    assert set(paths) == PNGS - {"learning_curves.png", "augmentation.png"} | TABLES
    _assert_png(paths["mistakes.png"])
    assert pd.read_csv(paths["per_class_accuracy.csv"])["accuracy"].eq(1.0).all()
    assert len(pd.read_csv(paths["mistakes.csv"])) == 0


def test_a_report_cut_short_shows_no_earlier_runs_page(tmp_path, split, monkeypatch):
    _, val_set = split
    perfect = torch.nn.functional.one_hot(val_set.labels, 10).float()
    report.write_report(tmp_path, val_set, perfect, log=lambda message: None)  # an earlier run's report
    monkeypatch.setattr(report, "_draw_figures", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))  # Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        report.write_report(tmp_path, val_set, _probabilities_with_mistakes(val_set.labels), log=lambda message: None)
    with open(tmp_path / "index.html", encoding="utf-8") as f:
        page = f.read()
    assert "<title>Digit Recognizer report: being written</title>" in page and "its run was stopped" in page


def test_report_without_matplotlib_still_writes_tables_and_page(tmp_path, split, monkeypatch):
    _, val_set = split
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    lines = []
    paths = report.write_report(tmp_path, val_set, _probabilities_with_mistakes(val_set.labels),
                                history=_history(), augment_config=AugmentConfig(), log=lines.append,
                                test_probabilities=torch.full((20, 10), 0.1), recipe=RECIPE)
    assert [line for line in lines if "skipped" in line] == [report.SKIPPED_NO_MATPLOTLIB]
    assert set(paths) == TABLES | {"least_confident_test.csv"}
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".png")]
    with open(paths["index.html"], encoding="utf-8") as f:
        page = f.read()
    assert "<img" not in page and "matplotlib is not installed" in page and "<th>most_confused_with</th>" in page
    assert len(pd.read_csv(paths["mistakes.csv"])) == len(MISTAKES)


# ----------------------------------------------------------------------------- main.py

@pytest.mark.parametrize("quiet", [True, False])
def test_main_report_and_quiet(tmp_path, kaggle_dir, capsys, monkeypatch, quiet):
    report_dir = tmp_path / "reports"
    argv = ["--data", str(kaggle_dir), "--epochs", "1", "--widths", "4", "8", "8", "--batch-size", "32",
            "--checkpoint-dir", str(tmp_path / "ck"),
            "--submission", str(tmp_path / "submission.csv"), "--report", str(report_dir) if quiet else ""]
    table = pd.read_csv(kaggle_dir / "train.csv")
    table.loc[::7, "label"] = (table.loc[::7, "label"] + 1) % 10  # 86 mislabelled rows, for mistakes.csv
    table.to_csv(kaggle_dir / "train.csv", index=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # as in a terminal: bars unless --quiet
    assert main_module.main(argv + (["--quiet"] if quiet else [])) == 0
    out, err = capsys.readouterr()
    assert ("img/s" in err) != quiet  # tqdm's bars go to stderr
    assert bool(re.search(r"^epoch +1/1 ", out, re.M)) != quiet
    assert len(pd.read_csv(tmp_path / "ck" / "history.csv")) == 1
    if quiet:
        assert set(os.listdir(report_dir)) == PNGS | TABLES | TEST_SET_FILES
        assert "per-class accuracy on 60 validation images" in out
        mistakes = pd.read_csv(report_dir / "mistakes.csv")  # each line number points at its train.csv row
        assert len(mistakes) and (table["label"].to_numpy()[mistakes["line"] - 2] == mistakes["label"]).all()
        assert set(mistakes["line"] - 2) & set(range(0, 600, 7))  # the mislabelled rows are among them
    else:
        assert not report_dir.exists() and "per-class" not in out


def test_main_bad_report_dir_is_one_line_exit_2(tmp_path, kaggle_dir, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main_module.main(["--data", str(kaggle_dir), "--report", str(blocker / "reports")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --report") and err.count("\n") == 1


# ----------------------------------------------------------------------------- inference.py

def test_inference_probs_output(tmp_path, checkpoint):
    test_csv = write_csv(tmp_path / "test.csv", make_digits(30, seed=3)[0])
    submission, probs_path = tmp_path / "submission.csv", tmp_path / "probs.csv"
    argv = ["--checkpoint", checkpoint, "--input", test_csv, "--output", str(submission), "--probs", str(probs_path)]
    assert inference.main(argv) == 0
    probs = pd.read_csv(probs_path)
    assert list(probs.columns) == ["ImageId"] + [f"p{k}" for k in range(10)]
    assert probs["ImageId"].tolist() == list(range(1, 31))
    values = probs[[f"p{k}" for k in range(10)]].to_numpy()
    np.testing.assert_allclose(values.sum(1), 1.0, atol=1e-5)
    assert (values.argmax(1) == pd.read_csv(submission)["Label"].to_numpy()).all()


def test_inference_report_on_labelled_csv(tmp_path, checkpoint, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    labelled = write_csv(tmp_path / "train.csv", *make_digits(50, seed=4))
    assert inference.main(["--checkpoint", checkpoint, "--input", labelled, "--report", "rep"]) == 0
    assert "note: rows a checkpoint trained on score optimistically" in capsys.readouterr().out
    assert set(os.listdir("rep")) == PNGS - {"learning_curves.png", "augmentation.png"} | TABLES
    assert pd.read_csv("rep/per_class_accuracy.csv")["images"].sum() == 50
    assert not os.path.exists("final_submission.csv")  # --report scores, it does not predict for Kaggle


def test_inference_report_replaces_an_earlier_report_whole(tmp_path, checkpoint, monkeypatch, capsys, full_report):
    """Over a training run's report, the files this report does not draw (curves, test set) go,
    so the page and the folder agree; a file that is not this suite's stays."""
    monkeypatch.chdir(tmp_path)
    shutil.copytree(full_report["folder"], "rep")
    user_png = PNG_SIGNATURE + b"not drawn by this suite"
    open("rep/augmentation.png", "wb").write(user_png)
    from matplotlib.figure import Figure
    Figure().savefig("rep/learning_curves.png")  # the user's own matplotlib figure, without this suite's mark
    users_figure = open("rep/learning_curves.png", "rb").read()
    open("rep/notes.txt", "w").write("mine")
    os.mkdir("data")
    write_csv(tmp_path / "data" / "train.csv", *make_digits(50, seed=4))
    assert inference.main(["--checkpoint", checkpoint, "--input", "data", "--report", "rep"]) == 0
    written = PNGS - {"learning_curves.png", "augmentation.png"} | TABLES
    assert set(os.listdir("rep")) == written | {"augmentation.png", "learning_curves.png", "notes.txt"}
    assert open("rep/augmentation.png", "rb").read() == user_png and open("rep/notes.txt").read() == "mine"
    assert open("rep/learning_curves.png", "rb").read() == users_figure
    assert "report: wrote 6 files to rep, removed 3 of an earlier report" in capsys.readouterr().out
    page = open("rep/index.html").read()
    assert "train.csv: where the model fails" in page and "(line: train.csv line (header = line 1))" in page


def test_inference_report_names_the_file_its_lines_are_in(tmp_path, checkpoint, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "holdout.csv", *make_digits(30, seed=4))
    assert inference.main(["--checkpoint", checkpoint, "--input", "holdout.csv", "--report", "rep"]) == 0
    page = open("rep/index.html").read()
    assert "holdout.csv line (header = line 1)" in page and "train.csv line" not in page


@pytest.mark.parametrize("name", ["tr$_$x.csv", os.fsdecode(b"tr\xff.csv")], ids=["dollars", "not UTF-8"])
def test_inference_report_on_a_file_whose_name_matplotlib_would_misread(tmp_path, checkpoint, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / name, *make_digits(30, seed=4))
    assert inference.main(["--checkpoint", checkpoint, "--input", name, "--report", "rep"]) == 0
    assert set(os.listdir("rep")) == PNGS - {"learning_curves.png", "augmentation.png"} | TABLES
    page = open("rep/index.html", "rb").read().decode("utf-8")  # valid UTF-8, as its <meta charset> says
    assert name.encode("utf-8", "surrogateescape").decode("utf-8", "replace") in page


def test_inference_report_blames_a_bad_cell_not_the_labels(tmp_path, checkpoint, capsys):
    labelled = write_csv(tmp_path / "train.csv", *make_digits(20))
    lines = open(labelled).read().splitlines()
    lines[3] = lines[3].rsplit(",", 1)[0] + ",300"
    open(labelled, "w").write("\n".join(lines) + "\n")
    assert inference.main(["--checkpoint", checkpoint, "--input", labelled, "--report", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {labelled}: line 4, column 'pixel783': value 300 is outside 0-255; pixels are 8-bit grey levels\n"


def test_a_replaced_output_keeps_its_permissions(tmp_path, checkpoint):
    test_csv = write_csv(tmp_path / "test.csv", make_digits(20, seed=3)[0])
    submission = tmp_path / "submission.csv"
    for mode, kept in ((0o600, 0o600), (0o640, 0o640), (0o6755, 0o755)):  # never a setuid or setgid bit
        submission.write_text("ImageId,Label\n")
        submission.chmod(mode)
        assert inference.main(["--checkpoint", checkpoint, "--input", test_csv, "--output", str(submission)]) == 0
        assert stat.S_IMODE(submission.stat().st_mode) == kept and len(submission.read_text().splitlines()) == 21


def test_inference_report_needs_labelled_input(tmp_path, checkpoint, capsys):
    unlabelled = write_csv(tmp_path / "test.csv", make_digits(20)[0])
    assert inference.main(["--checkpoint", checkpoint, "--input", unlabelled, "--report", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --report needs labelled input:") and "'label'" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--checkpoint", checkpoint, "--report", "r", "--output", "x.csv"])
    assert exit_info.value.code == 2
