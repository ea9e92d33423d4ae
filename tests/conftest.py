"""Small synthetic Digit Recognizer data, written in Kaggle's CSV format; the real data when present;
helpers for checking user errors."""

import contextlib
import functools
import os
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_ZIP = os.path.join(ROOT, "..", "shared", "data", "digit-recognizer.zip")


def find_real_data():
    """The real Kaggle data, found as the command line finds it: ../shared/data/digit-recognizer.zip,
    else the user's own data/ in the repository root (the CSVs or the Kaggle zip); None when absent."""
    from dataloader import DataError, find_data
    if os.path.exists(SHARED_ZIP):
        return SHARED_ZIP
    with contextlib.chdir(ROOT):
        try:
            return os.path.join(ROOT, find_data(kaggle_root=os.path.join(ROOT, "no-kaggle-input")))
        except DataError:
            return None


REAL_DATA = find_real_data()
needs_real_data = pytest.mark.skipif(REAL_DATA is None, reason="needs ../shared/data/digit-recognizer.zip or "
                                                               "the Kaggle data in data/")


def real_csv_head(name, rows):
    """The header and first `rows` rows of the real train.csv or test.csv, as bytes."""
    from dataloader import resolve_csv
    _, opener = resolve_csv(REAL_DATA, name)
    with opener() as f:
        return b"".join(next(f) for _ in range(rows + 1))


def make_digits(n, seed=0):
    """(images uint8 (n, 1, 28, 28), labels int64 (n,)): class k is a bright 4x4 block at
    its own spot on a 3x4 grid of spots, plus noise: easy to learn, survives small warps."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(n, 28, 28))
    for i, k in enumerate(labels):
        row, col = 4 + 7 * (k // 4), 3 + 6 * (k % 4)
        images[i, row:row + 4, col:col + 4] = rng.integers(200, 256, size=(4, 4))
    return torch.from_numpy(images.astype(np.uint8)).view(n, 1, 28, 28), torch.from_numpy(labels.astype(np.int64))


def small_recipe(**settings):
    """The default recipe with `settings` (flag names with underscores) changed."""
    from cli import replace_settings
    from recipe import Recipe
    return replace_settings(Recipe(), settings)


def write_csv(path, images, labels=None):
    header = ([] if labels is None else ["label"]) + [f"pixel{i}" for i in range(784)]
    pixels = images.view(len(images), 784).numpy().astype(np.int64)
    table = pixels if labels is None else np.column_stack([labels.numpy(), pixels])
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        np.savetxt(f, table, fmt="%d", delimiter=",")
    return str(path)


ROWS = 12  # rows of the small good CSVs every bad one is made from


@functools.cache
def good_lines(labelled):
    """Lines (header first) of a good train.csv (labelled) or test.csv of ROWS rows."""
    images, labels = make_digits(ROWS, seed=5)
    with tempfile.TemporaryDirectory() as folder:
        path = write_csv(os.path.join(folder, "good.csv"), images, labels if labelled else None)
        return tuple(Path(path).read_text().splitlines())


def edit_cell(value, column="pixel5", line=4):
    """Content with one cell replaced; line numbers count the header as line 1, like editors."""
    def edit(lines):
        cells = lines[line - 1].split(",")
        cells[lines[0].split(",").index(column)] = value
        return "\n".join([*lines[:line - 1], ",".join(cells), *lines[line:]]) + "\n"
    return edit


def edit_line(change, line=4):
    def edit(lines):
        return "\n".join([*lines[:line - 1], change(lines[line - 1]), *lines[line:]]) + "\n"
    return edit


@pytest.fixture(autouse=True)
def run_in_tmp_path(tmp_path, monkeypatch):
    """Default relative outputs (reports/, checkpoints/, final_submission.csv) land in tmp_path."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def kaggle_dir(tmp_path):
    """A folder with a synthetic train.csv (600 rows) and test.csv (120 rows)."""
    folder = tmp_path / "data"
    folder.mkdir()
    write_csv(folder / "train.csv", *make_digits(600, seed=1))
    write_csv(folder / "test.csv", make_digits(120, seed=2)[0])
    return folder


@pytest.fixture
def kaggle_input(tmp_path, monkeypatch):
    """A simulated Kaggle Notebook input root (empty until a test fills it), so /kaggle/input is never read."""
    from dataloader import KAGGLE_INPUT_ENV
    root = tmp_path / "kaggle-input"
    monkeypatch.setenv(KAGGLE_INPUT_ENV, str(root))
    return root


@pytest.fixture(autouse=True)
def one_thread():
    """Every test on one thread: on 2 shared, busy cores a second OpenMP thread mostly waits for
    CPU time, and each step then takes ~40x longer (the tiny models gain nothing from a second
    thread on idle cores either). Subprocesses get OMP_NUM_THREADS=1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli(capsys, module, *argv):
    """Run main.main or inference.main in-process: (exit code, stdout, stderr lines)."""
    sigterm = signal.getsignal(signal.SIGTERM)  # main.main installs its own handler
    try:
        code = module.main([str(a) for a in argv])
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def assert_user_error(code, err, *fragments):
    """Exit 2 with one stderr line (so no traceback) starting "error: " and naming every fragment."""
    assert code == 2, err
    assert len(err) == 1, err  # one line, so no traceback
    assert err[0].startswith("error: "), err
    for fragment in fragments:
        assert str(fragment) in err[0]


def snapshot(folder):
    """{relative path: (bytes, mtime_ns)} of every regular file under `folder`, temp files included
    (pipes and devices are left out: reading a pipe would block)."""
    files = [Path(d, name) for d, _, names in os.walk(folder) for name in names if Path(d, name).is_file()]
    return {str(f.relative_to(folder)): (f.read_bytes(), f.stat().st_mtime_ns) for f in files}


LONGEST_FILES = ["test_distributed.py", "test_robustness.py", "test_resume.py"]  # torchrun, real processes


def pytest_collection_modifyitems(items):
    """The longest test files first: pytest.ini hands whole files to the workers in this order,
    so the others fill in around them instead of one long file running alone at the end."""
    items.sort(key=lambda item: LONGEST_FILES.index(item.path.name) if item.path.name in LONGEST_FILES
               else len(LONGEST_FILES))
