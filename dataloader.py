"""Kaggle Digit Recognizer data: CSV reading and checking, the Dataset, the split, augmentation.

CSV files are read with pandas, in chunks, straight from Kaggle's zip, an unpacked
folder, a `.csv` or a `.csv.gz`; find_data looks in data/ and a Kaggle Notebook's input
when no path is given. Every chunk is checked (columns, numbers, 0-255 pixels, 0-9 labels,
line lengths, so memory stays bounded) and converted once to a uint8 tensor of shape
(N, 1, 28, 28); any problem raises DataError with one line naming the file, the line and
column, and the fix.
Augmentation is a batched random affine warp (rotation, scale, shear, shift) plus an
optional elastic distortion, done with `affine_grid`/`grid_sample` on the training device.
"""

import collections
import contextlib
import gzip
import io
import math
import os
import re
import warnings
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cli import UserError, setting

IMAGE_SIDE = 28
NUM_PIXELS = IMAGE_SIDE * IMAGE_SIDE
PIXEL_COLUMNS = [f"pixel{i}" for i in range(NUM_PIXELS)]
CHUNK_ROWS = 8192  # rows per pandas chunk: bounded memory (~50 MB of int64) at full speed
KAGGLE_LINE_BYTES = (NUM_PIXELS + 1) * 4  # label + 784 pixels, each at most "255,"
MAX_LINE_BYTES = (NUM_PIXELS + 1) * 32  # generous: room for numpy.savetxt's 25-byte "2.550000000000000000e+02"
KAGGLE_INPUT_ENV = "DIGIT_RECOGNIZER_KAGGLE_INPUT"  # where Kaggle Notebooks mount data (tests point it elsewhere)
KAGGLE_ZIP = "digit-recognizer.zip"  # the name the Kaggle CLI downloads the competition's data as
GET_THE_DATA = ("get the data with `kaggle competitions download -c digit-recognizer -p data`, "
                "or in a Kaggle Notebook with Add data -> Digit Recognizer competition")


class DataError(UserError):
    """Unusable input data; the message is one line: what, where, how to fix."""


class NoLabelColumn(DataError):
    """A training CSV without its 'label' column (a test.csv, say)."""


def _uint8_parse_refuses_overflow():
    """Whether pandas refuses a cell that uint8 cannot hold: pandas 3 does; pandas 2 wraps it
    without a word (300 -> 44, -1 -> 255)."""
    try:
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pd.read_csv(io.StringIO("pixel0\n256\n"), dtype=np.uint8)
    except (ValueError, OverflowError):
        return True
    return False


# The first, fast pass parses straight to this dtype; int64 where uint8 would wrap, range-checked per chunk.
FAST_DTYPE = np.uint8 if _uint8_parse_refuses_overflow() else np.int64


# ----------------------------------------------------------------------------- sources

def find_data(path=None, names=("train.csv", "test.csv"), kaggle_root=None):
    """The folder, zip or CSV file to read `names` from, each checked to be there.

    `path` (--data/--input) is used when given. Without it, the first of data/,
    data/digit-recognizer.zip (as the Kaggle CLI leaves it) and <kaggle_root>/digit-recognizer
    (a Kaggle Notebook's read-only copy) that holds any of `names` is taken. `kaggle_root`
    defaults to $DIGIT_RECOGNIZER_KAGGLE_INPUT, else /kaggle/input. A single CSV file cannot
    be two of `names`: the test set would be the training images.
    """
    if path is None:
        root = kaggle_root or os.environ.get(KAGGLE_INPUT_ENV) or "/kaggle/input"  # set but empty: the default
        candidates = [os.path.join("data", ""), os.path.join("data", KAGGLE_ZIP),
                      os.path.join(root, "digit-recognizer", "")]
        path = next((c for c in candidates if _holds_any(c, names)), None)
        if path is None:
            raise DataError(f"found no {' or '.join(names)} in {', '.join(candidates)}; {GET_THE_DATA}, "
                            f"or pass the folder or zip that holds the data")
    if len(names) > 1 and os.path.exists(path) and not os.path.isdir(path) and not _is_zip(path):  # a file or pipe
        if _is_gzipped_zip(path):
            raise DataError(f"{path}: is a zip compressed again with gzip; gunzip it and pass the zip")
        raise DataError(f"{path}: one CSV file cannot be both {' and '.join(names)} (the test set would be the "
                        f"training images); pass the folder or the Kaggle zip that holds them all")
    files = [resolve_csv(path, name)[0] for name in names]
    if len(files) == 2 and all(os.path.isfile(f) for f in files) and os.path.samefile(*files):  # e.g. a symlink
        raise DataError(f"{files[1]}: is the same file as {files[0]} (the test set would be the training images); "
                        f"put Kaggle's {names[1]} there")
    return path


def _holds_any(path, names):
    if os.path.isdir(path):
        return any(_csv_files_in(path, name) for name in names)
    return os.path.isfile(path)


def source_files(path, name):
    """The files reading `name` from `path` (a --data/--input) would read: a folder's `name`,
    `name`.gz or, holding neither, its digit-recognizer.zip; else `path` itself. For the checks
    that no output replaces an input."""
    if os.path.isdir(path):
        return _csv_files_in(path, name) or [os.path.join(path, KAGGLE_ZIP)]
    return [path]


def names_read_as_data(path):
    """[(path, why)] of the CSV names that a later run reading the data's folder (`path`
    itself, or the folder of a zip) or the default data/ would take as its data: an output
    written there (`--output data/train.csv` beside the zip) would stand in for the real data,
    also when the output would make data/ itself."""
    data_folder = path if os.path.isdir(path) else (os.path.dirname(path) or ".") if _is_zip(path) else None
    folders = [data_folder] if data_folder else []
    made_by_the_output = not os.path.exists("data")
    if made_by_the_output or os.path.isdir("data") and not (data_folder and os.path.samefile(data_folder, "data")):
        folders.append("data")
    endings = ["", ".gz", ".gZ", ".Gz", ".GZ"]  # a .gz is read whatever its case
    return [(os.path.join(folder, name + ending), f"later runs would read it as the {kind} data in "
             f"{os.path.join(folder, '')}") for folder in folders
            for name, kind in (("train.csv", "training"), ("test.csv", "test")) for ending in endings]


def _csv_files_in(folder, name):
    """The files in `folder` named `name` or `name`.gz (the .gz in any case, as _open_file reads it)."""
    try:
        gzipped = sorted(entry for entry in os.listdir(folder) if entry.lower() == name + ".gz")
    except OSError:  # unreadable folder: reading it fails later with its own message
        gzipped = []
    return [full for full in (os.path.join(folder, entry) for entry in [name, *gzipped]) if os.path.isfile(full)]


def _is_gzipped_zip(path):
    """A regular file of gzip data that holds a zip (Kaggle's zip, gzipped again)."""
    if not os.path.isfile(path):
        return False
    with contextlib.suppress(OSError, EOFError, zlib.error), gzip.open(path) as f:  # BadGzipFile: an OSError
        return f.read(4) == b"PK\x03\x04"
    return False


def _is_zip(path):
    # is_zipfile reads a device such as /dev/zero to its (endless) end: regular files only
    return str(path).lower().endswith(".zip") or (os.path.isfile(path) and zipfile.is_zipfile(path))


def resolve_csv(path: str, name: str):
    """Find `name` ('train.csv' or 'test.csv') in a folder (or the Kaggle zip in it), a Kaggle
    zip, or take `path` as the CSV.

    Returns (label for messages, opener) where opener() gives a binary file object.
    """
    if not os.path.exists(path):
        folder = os.path.dirname(os.path.normpath(path)) or "."
        if os.path.isfile(os.path.join(folder, KAGGLE_ZIP)):  # data/train.csv where data/ holds Kaggle's zip
            raise DataError(f"{path}: no such file, but {os.path.join(folder, KAGGLE_ZIP)} is there; pass that zip "
                            f"or its folder, {os.path.join(folder, '')}, which reads {name} from it")
        raise DataError(f"{path}: no such file or folder; check the path, or {GET_THE_DATA}")
    if os.path.isdir(path):
        found = _csv_files_in(path, name)
        if len(found) > 1:
            names = ", ".join(os.path.basename(f) for f in found)
            raise DataError(f"{path}: holds {names}; keep only one of them, so it is clear which to read")
        if found:
            return found[0], lambda: _open_file(found[0])
        if os.path.isfile(os.path.join(path, KAGGLE_ZIP)):  # data/ as `kaggle competitions download -p data` leaves it
            return _resolve_zip_member(os.path.join(path, KAGGLE_ZIP), name)
        with contextlib.suppress(OSError):
            if name in os.listdir(path):  # listed, yet not a file it can stat
                raise DataError(f"{os.path.join(path, name)}: cannot be read (a broken link, a folder, or a folder "
                                f"without search permission); fix it or pass the file's own path")
        raise DataError(f"{path}: folder has no {name} and no {KAGGLE_ZIP}; put Kaggle's files there or pass "
                        f"their path")
    if _is_zip(path):
        return _resolve_zip_member(path, name)
    return path, lambda: _open_file(path)


def _open_file(path):
    return gzip.open(path) if str(path).lower().endswith(".gz") else open(path, "rb")


def _resolve_zip_member(path, name):
    if not os.path.isfile(path):  # zipfile would read a device such as /dev/zero to its endless end
        raise DataError(f"{path}: is not a regular file (a device or pipe); pass the Kaggle zip itself")
    try:
        with zipfile.ZipFile(path) as archive:  # a zip made on Windows may separate folders with backslashes
            members = [m for m in archive.infolist() if os.path.basename(m.filename.replace("\\", "/")) == name]
    except zipfile.BadZipFile as e:
        raise DataError(_damaged_zip(path, e)) from None
    except OSError as e:
        raise DataError(_unreadable(path, e)) from None
    if not members:
        raise DataError(f"{path}: zip has no {name}; pass the digit-recognizer.zip that Kaggle ships")
    if len(members) > 1:
        raise DataError(f"{path}: zip holds {len(members)} files named {name} ({', '.join(m.filename for m in members)})"
                        f"; pass a zip or folder with one")
    member, label = members[0], f"{path}:{members[0].filename}"
    if member.flag_bits & 0x1:  # the zip format's "encrypted" bit
        raise DataError(f"{label}: is encrypted; unzip it with its password and pass the folder, "
                        f"or use Kaggle's digit-recognizer.zip, which is not encrypted")
    if member.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
        method = zipfile.compressor_names.get(member.compress_type, f"method {member.compress_type}")
        raise DataError(f"{label}: is compressed with {method}, which Python cannot read; "
                        f"unpack it with unzip or 7-Zip and pass the folder")
    return label, lambda: zipfile.ZipFile(path).open(member)


def _unreadable(path, error):
    if isinstance(error, PermissionError):
        return f"{path}: permission denied; check its permissions (ls -l) or pass a readable copy"
    return f"{path}: cannot be read ({error.strerror or type(error).__name__}); pass the Kaggle train.csv/test.csv"


def _damaged_zip(path, error):
    return f"{path}: damaged zip ({error}); download digit-recognizer.zip again"


def _damaged_compressed(path, error):
    return f"{path}: damaged compressed data ({error}); download or compress it again"


def _last_line_end(block, start, end):
    """Index of the last line end in block[start:end], or -1: a newline, or the carriage
    return that ends lines in old Mac files (pandas reads those too)."""
    return max(block.rfind(b"\n", start, end), block.rfind(b"\r", start, end))


def _line_ends(block):
    return block.count(b"\n") + block.count(b"\r") - block.count(b"\r\n")


class _LineBoundedReader(io.BufferedIOBase):
    """The binary stream pandas reads, raising DataError as soon as a line passes MAX_LINE_BYTES.

    pandas would buffer an endless line (a wrong file, /dev/zero) until memory runs out;
    here each block it asks for is checked, so at most one block past the limit is read.
    """

    def __init__(self, raw, label):
        self._raw, self._label = raw, label
        self._line_bytes = 0  # of the unfinished line at the end of what was read
        self._lines_ended = 0
        self._ended_in_cr = False  # a "\r\n" split between two reads is one line end, not two
        # pandas reads a column of True/False cells as 1/0, even into uint8; Kaggle's files
        # hold digits and commas only, so a T or F (5 ms a file to look for) sends the
        # reading to the cell-checked pass, which refuses them.
        self.may_hold_booleans = False

    def readable(self):
        return True

    def read(self, size=-1):
        block = self._raw.read(size)
        if self._lines_ended == 0 and self._line_bytes == 0:  # the file's first bytes
            if block[:2] in (b"\xff\xfe", b"\xfe\xff"):
                raise DataError(f"{self._label}: is UTF-16 text (it starts with a UTF-16 byte order mark); save it "
                                f"as UTF-8 or plain ASCII, as Kaggle ships it")
            if block.startswith((b"\x1f\x8b", b"PK\x03\x04")):  # e.g. <(gzip -c test.csv), or a .gz renamed .csv
                kind = "gzip" if block.startswith(b"\x1f\x8b") else "zip"
                raise DataError(f"{self._label}: is {kind}-compressed data, not CSV text; pass it as a file named "
                                f".{'gz' if kind == 'gzip' else 'zip'}, or decompressed (zcat, unzip -p)")
            if block.removeprefix(b"\xef\xbb\xbf").lstrip(b" \t")[:1] in (b"\n", b"\r"):  # pandas: miscount, fail
                raise DataError(f"{self._label}: line 1 is blank; the header line (label,pixel0,... in train.csv, "
                                f"pixel0,... in test.csv) must come first: delete the blank lines above it")
        counted = 1 if self._ended_in_cr and block.startswith(b"\n") else 0  # its "\r" was counted already
        self._ended_in_cr = block.endswith(b"\r")
        start = -self._line_bytes  # where the current line began, relative to this block
        while len(block) - start > MAX_LINE_BYTES:
            # Lines are short: jump to the last line end within reach of the line start.
            line_end = _last_line_end(block, max(start, 0), start + MAX_LINE_BYTES + 1)
            if line_end < 0:
                line = self._lines_ended + _line_ends(block[:max(start, 0)]) - counted + 1
                raise DataError(f"{self._label}: line {line} is {MAX_LINE_BYTES + 1:,}+ bytes long; a Kaggle row "
                                f"is at most {KAGGLE_LINE_BYTES:,} bytes; is this the Kaggle CSV?")
            start = line_end + 1
        if not self.may_hold_booleans:
            self.may_hold_booleans = any(letter in block for letter in (b"T", b"t", b"F", b"f"))
        line_end = _last_line_end(block, max(start, 0), len(block))
        self._line_bytes = len(block) - (start if line_end < 0 else line_end + 1)
        self._lines_ended += _line_ends(block) - counted
        return block

    def read1(self, size=-1):  # io.TextIOWrapper (older pandas wraps the stream in one) reads this way
        return self.read(size if size is not None and size >= 0 else 1 << 18)

    def readinto(self, buffer):
        block = self.read(len(buffer))
        buffer[:len(block)] = block
        return len(block)

    def close(self):
        self._raw.close()
        super().close()


def _read_chunks(label, opener, chunk_rows, dtype=None):
    try:
        with _LineBoundedReader(opener(), label) as source:
            # A blank line is kept (as a row of blanks): skipped, it would shift every later line number.
            # low_memory=False: the checked pass types each chunk's column as a whole, or a block of
            # True/False cells among numbers came back as Python bools, which to_numeric takes as 1/0.
            reader = pd.read_csv(source, chunksize=chunk_rows, dtype=dtype, skip_blank_lines=False,
                                 low_memory=dtype is not None)
            while True:
                with np.errstate(invalid="ignore"), warnings.catch_warnings():
                    # An Inf cell cast to uint8 warns, then raises; a column of text and numbers warns
                    # (DtypeWarning); both are reported as one DataError line instead.
                    warnings.simplefilter("ignore", pd.errors.DtypeWarning)
                    chunk = next(reader, None)
                if chunk is None:
                    return
                if dtype is not None and source.may_hold_booleans:
                    raise ValueError("True/False cells")  # iter_digit_csv's cell-checked pass names the cell
                yield chunk
    except pd.errors.EmptyDataError:
        raise DataError(f"{label}: file is empty; expected a Kaggle CSV with a header line") from None
    except pd.errors.ParserError as e:  # e.g. "Expected 785 fields in line 7, saw 786"
        detail = str(e).strip().splitlines()[0].removeprefix("Error tokenizing data. C error: ")
        quote = re.match(r"EOF inside string starting at row (\d+)", detail)  # rows count from 0: the header
        if quote:
            raise DataError(f"{label}: line {int(quote[1]) + 1}: a quote (\") opens a cell and nothing closes it; "
                            f"remove it") from None
        raise DataError(f"{label}: {detail}; every line needs the header's number of cells") from None
    except zipfile.BadZipFile as e:
        raise DataError(_damaged_zip(label, e)) from None
    except (zlib.error, EOFError, gzip.BadGzipFile) as e:  # a corrupt deflate stream (zip or .gz), a .gz cut short
        raise DataError(_damaged_compressed(label, e)) from None
    except UnicodeDecodeError as e:
        raise DataError(f"{label}: not a readable CSV ({type(e).__name__}); pass the Kaggle train.csv/test.csv") from None
    except OSError as e:
        raise DataError(_unreadable(label, e)) from None


# ----------------------------------------------------------------------------- checking

def _shown(text, limit=40):
    """A cell or column name as a message quotes it: control characters escaped, a long one cut."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return text if len(text) <= limit else text[:limit] + "..."


def _as_written(column, names):
    """The header cell that pandas read as `column`: it renames a repeated 'label' to 'label.1'."""
    written = re.sub(r"\.\d+$", "", column)
    return written if written in names else column


def _check_columns(label, columns, expect_label):
    columns = [str(c).strip() for c in columns]
    if columns[0].startswith("#"):
        if columns[0].lstrip("# ") in ("label", "pixel0"):  # numpy.savetxt(header=...) writes '# ' before it
            raise DataError(f"{label}: the header line starts with '#' (numpy's savetxt adds '# ' unless "
                            f"comments=''); remove the '#'")
        raise DataError(f"{label}: the first line is a comment ({_shown(columns[0])}), not the header; delete it")
    if len(columns) == 1:  # one long header cell: the cells are split by something else
        for separator, name in ((";", "';'"), ("\t", "tabs"), ("|", "'|'"), (" ", "spaces")):
            if separator in columns[0]:
                raise DataError(f"{label}: uses {name} between cells; Kaggle's CSVs use commas")
    if columns[0] == "ImageId" and "pixel0" in columns:
        raise DataError(f"{label}: has an 'ImageId' column before the pixels; Kaggle's "
                        f"{'train' if expect_label else 'test'}.csv has none: drop that column")
    if columns[0] == "ImageId":  # a submission or --probs file
        raise DataError(f"{label}: is predictions ({', '.join(columns[:2])}, ...), not Kaggle's "
                        f"{'train' if expect_label else 'test'}.csv; pass that file")
    kaggle_header = f"{'label,' if expect_label else ''}pixel0,...,pixel783"
    if not any(c == "label" or c.startswith("pixel") for c in columns):
        first = ", ".join(_shown(_as_written(c, set(columns))) for c in columns[:3])  # pandas made a repeated '0' '0.1'
        if any(c.lower() == "label" or c.lower().startswith("pixel") for c in columns):
            raise DataError(f"{label}: the header's names are not lower-case ({first}, ...); Kaggle's header is "
                            f"{kaggle_header}")
        raise DataError(f"{label}: no header line (the first line is {first}, ...); add Kaggle's "
                        f"header, {kaggle_header}, as the first line")
    names = set(columns)
    repeated = next((c for c, count in collections.Counter(_as_written(c, names) for c in columns).items()
                     if count > 1), None)
    if repeated is not None:  # pandas renames only exact repeats; ' label' and 'label' reach here as they are
        raise DataError(f"{label}: column '{_shown(repeated)}' appears twice in the header; keep one of them")
    unnamed = next((i for i, c in enumerate(columns) if c.startswith("Unnamed: ") or not c), None)
    if unnamed is not None:  # pandas names a header cell that is empty 'Unnamed: N'
        why = ("the index that pandas' to_csv writes unless index=False" if unnamed == 0 else
               "a comma at the end of each line" if unnamed == len(columns) - 1 else "two commas in a row")
        raise DataError(f"{label}: column {unnamed + 1} has no name in the header ({why}?); drop that column")
    pixel_columns = [c for c in columns if c != "label"]
    if expect_label and "label" not in columns:
        raise NoLabelColumn(f"{label}: no 'label' column; a training CSV needs label,pixel0..pixel783")
    if len(pixel_columns) != NUM_PIXELS:
        raise DataError(
            f"{label}: {len(pixel_columns)} pixel columns, expected {NUM_PIXELS} (pixel0..pixel783); "
            f"is this the Kaggle digit-recognizer CSV?"
        )
    if pixel_columns != PIXEL_COLUMNS:
        bad = next(c for c, want in zip(pixel_columns, PIXEL_COLUMNS) if c != want)
        raise DataError(f"{label}: unexpected column '{_shown(bad)}'; pixel columns must be named pixel0..pixel783 "
                        f"in order")


def _numeric(label, chunk, first_line):
    """The chunk as numbers, or DataError for its first blank line or blank, NaN, Inf, True/False or fractional cell.

    Whole numbers written as floats ("3.0") are accepted; the caller checks their range.
    """
    if all(pd.api.types.is_integer_dtype(t) for t in chunk.dtypes):
        return chunk
    numeric = chunk.apply(pd.to_numeric, errors="coerce")
    values = numeric.to_numpy(dtype=np.float64)
    is_boolean = np.array([pd.api.types.is_bool_dtype(t) for t in chunk.dtypes])  # a column of True/False cells
    bad = ~np.isfinite(values) | (values != np.round(values)) | is_boolean
    if not bad.any():
        return numeric
    row, col = np.argwhere(bad)[0]  # the first bad line, then its first bad column
    if chunk.iloc[row].isna().all():
        raise DataError(f"{label}: line {first_line + row} is blank; delete it (each line is one image)")
    raw, where = chunk.iat[row, col], f"{label}: line {first_line + row}, column '{chunk.columns[col]}'"
    if pd.isna(raw) or (isinstance(raw, str) and not raw.strip()):
        raise DataError(f"{where}: blank or NaN cell; every cell must be a whole number")
    if is_boolean[col]:
        raise DataError(f"{where}: a True/False cell; every cell must be a whole number")
    raise DataError(f"{where}: '{_shown(raw)}' is not a whole number; fix or drop that row")


def _chunk_to_tensors(label, raw, first_line, keep_label):
    chunk = _numeric(label, raw, first_line)
    values = chunk.to_numpy()  # (n, columns); _check_columns made the non-label ones pixel0..783 in order
    pixels = np.delete(values, chunk.columns.get_loc("label"), axis=1) if keep_label else values
    if pixels.min() < 0 or pixels.max() > 255:
        row, col = np.argwhere((pixels < 0) | (pixels > 255))[0]
        raise DataError(
            f"{label}: line {first_line + row}, column 'pixel{col}': value {raw[f'pixel{col}'].iat[row]} "
            f"is outside 0-255; pixels are 8-bit grey levels"
        )
    images = torch.from_numpy(pixels.astype(np.uint8, copy=False)).view(-1, 1, IMAGE_SIDE, IMAGE_SIDE)
    if not keep_label:
        return images, None
    labels = chunk["label"].to_numpy()
    bad = (labels < 0) | (labels > 9)
    if bad.any():
        row = int(np.argmax(bad))
        raise DataError(f"{label}: line {first_line + row}, column 'label': {raw['label'].iat[row]} is not a digit 0-9")
    return images, torch.from_numpy(labels.astype(np.int64))


def iter_digit_csv(path, name, labelled, chunk_rows=CHUNK_ROWS, log=print):
    """Yield checked (images uint8 (n, 1, 28, 28), labels int64 (n,) or None) chunks of a CSV.

    `labelled`: True for train.csv (label column required), False for test.csv (a label
    column is accepted and ignored, with one note through `log`).

    Clean files take the fast path: pandas parses straight to FAST_DTYPE (uint8, which also
    rejects anything that is not a whole number in 0-255; int64 under pandas 2, whose uint8
    wraps, then range-checked), and hands back one block per chunk
    (0.01 s to an array instead of 0.4 s for 784 separate int64 columns). At the first
    cell it rejects, the file is read again cell-checked, from the chunk it stopped at,
    to name the exact line and column. A pipe cannot be read twice: it is cell-checked
    from the start.
    """
    label, opener = resolve_csv(path, name)
    if not (os.path.isdir(path) or os.path.isfile(path)):  # a pipe, /dev/stdin, <(...)
        yield from _checked_chunks(label, opener, labelled, chunk_rows, log)
        return
    try:
        yield from _fast_then_checked(label, opener, labelled, chunk_rows, log)
    except DataError:
        _raise_if_damaged(label, opener)  # a damaged zip or .gz, not the line its garbage landed on
        raise


def _fast_then_checked(label, opener, labelled, chunk_rows, log):
    chunks_done = 0
    try:
        for chunk in _checked_chunks(label, opener, labelled, chunk_rows, log, dtype=FAST_DTYPE):
            yield chunk
            chunks_done += 1
    except (ValueError, OverflowError):  # a cell uint8 cannot hold; OverflowError past 2**64
        quiet = chunks_done > 0  # the first pass has given its notes by then
        checked = _checked_chunks(label, opener, labelled, chunk_rows, log=(lambda *_: None) if quiet else log)
        for index, chunk in enumerate(checked):
            if index >= chunks_done:
                yield chunk


def _raise_if_damaged(label, opener):
    """DataError if `opener`'s zip member or .gz file fails its CRC or its decompression: read
    to its end, zipfile and gzip check it. Plain files are not read again."""
    try:
        with opener() as stream:
            if not isinstance(stream, (zipfile.ZipExtFile, gzip.GzipFile)):
                return
            while stream.read(1 << 20):
                pass
    except zipfile.BadZipFile as e:
        raise DataError(_damaged_zip(label, e)) from None
    except (zlib.error, EOFError, gzip.BadGzipFile) as e:
        raise DataError(_damaged_compressed(label, e)) from None
    except OSError:
        return  # the first error's message stands


def _checked_chunks(label, opener, labelled, chunk_rows, log, dtype=None):
    rows = 0
    for chunk in _read_chunks(label, opener, chunk_rows, dtype):
        chunk.columns = [str(c).strip() for c in chunk.columns]
        if rows == 0:
            _check_columns(label, chunk.columns, expect_label=labelled)
            if not isinstance(chunk.index, pd.RangeIndex):  # pandas takes surplus leading cells as the index
                raise DataError(f"{label}: line 2 has {chunk.index.nlevels + len(chunk.columns)} cells, the header "
                                f"{len(chunk.columns)}; every line needs the header's number of cells")
            if not labelled and "label" in chunk.columns:
                log(f"note: {label} has a 'label' column; it is ignored for prediction")
        if not labelled and "label" in chunk.columns:
            chunk = chunk.drop(columns="label")  # an ignored label column is not checked either
        if len(chunk) == 0:
            continue
        yield _chunk_to_tensors(label, chunk, first_line=rows + 2, keep_label=labelled)
        rows += len(chunk)
    if rows == 0:
        raise DataError(f"{label}: has a header but no rows of digits; add the image rows below the header")


def load_digit_csv(path, name, labelled, log=print):
    """Read a whole CSV: (images uint8 (N, 1, 28, 28), labels int64 (N,) or None)."""
    chunks = list(iter_digit_csv(path, name, labelled, log=log))
    images = torch.cat([images for images, _ in chunks])
    labels = torch.cat([labels for _, labels in chunks]) if labelled else None
    return images, labels


def load_train(path, log=print):
    return load_digit_csv(path, "train.csv", labelled=True, log=log)


def load_test(path, log=print):
    return load_digit_csv(path, "test.csv", labelled=False, log=log)[0]


# ----------------------------------------------------------------------------- dataset

class DigitDataset:
    """Images (N, 1, 28, 28) uint8, labels (N,) int64 and each image's row in its CSV (N,),
    held as whole tensors. The training loop slices `images[idx]` for a batch of indices;
    `rows` follows every subset, so a report can name an image's line in train.csv.
    """

    def __init__(self, images, labels, rows=None):
        if labels is not None and len(labels) != len(images):
            raise ValueError("images and labels differ in length")
        self.images = images
        self.labels = labels
        self.rows = torch.arange(len(images)) if rows is None else rows

    def __len__(self):
        return len(self.images)

    def subset(self, indices):
        return DigitDataset(self.images[indices], self.labels[indices], self.rows[indices])

    def to(self, device):
        return DigitDataset(self.images.to(device), self.labels.to(device), self.rows)

    @property
    def line_numbers(self):
        """Each image's line in its CSV file: line 1 is the header."""
        return self.rows + 2


def stratified_split(labels, val_fraction, seed):
    """Indices (train, val): `val_fraction` of every class to validation, seeded."""
    if val_fraction <= 0:
        return torch.arange(len(labels)), torch.arange(0)
    generator = torch.Generator().manual_seed(seed)
    train_parts, val_parts = [], []
    for digit in labels.unique().tolist():
        members = torch.nonzero(labels == digit).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_val = _validation_rows(len(members), val_fraction)
        val_parts.append(members[:n_val])
        train_parts.append(members[n_val:])
    return torch.cat(train_parts).sort().values, torch.cat(val_parts).sort().values


def _validation_rows(class_rows, val_fraction):
    """Validation images of a digit with `class_rows` images: its share, at least 1 of 2+."""
    n_val = int(round(val_fraction * class_rows))
    return max(n_val, 1) if class_rows >= 2 else n_val


def check_training_set(path, labels, val_fraction, log=print):
    """For the `labels` loaded from `path`: DataError if `val_fraction` of each digit (as
    stratified_split takes it) gives no validation image; a warning line through `log` for
    digits with no images (a run on a subset can still be useful; it just never predicts them)."""
    label, _ = resolve_csv(path, "train.csv")
    counts = torch.bincount(labels, minlength=10).tolist()
    if val_fraction > 0 and not any(_validation_rows(count, val_fraction) for count in counts):
        raise DataError(f"{label}: {len(labels)} training rows leave no validation images ({val_fraction:.0%} of "
                        f"each digit); a digit needs 2+ rows to be in both sets (Kaggle's train.csv has "
                        f"42,000), or train without validation (--full-train)")
    missing = [str(digit) for digit, count in enumerate(counts) if count == 0]
    if missing:
        log(f"warning: {label}: no training images of {'digit' if len(missing) == 1 else 'digits'} "
            f"{', '.join(missing)}; the model will never predict {'it' if len(missing) == 1 else 'them'}")


# ----------------------------------------------------------------------------- augmentation

@dataclass(frozen=True)
class AugmentConfig:
    rotate_deg: float = setting(10.0, "max rotation, degrees either way", low=0, high=180, flag="--rotate")
    scale: float = setting(0.1, "zoom drawn from [1 - scale, 1 + scale]", low=0, high=1, high_open=True)
    shear: float = setting(0.1, "max shear, as tan(angle)", low=0, high=1)
    shift: float = setting(0.1, "max shift, fraction of the image side (0.1 = 2.8 px)", low=0, high=0.5)
    elastic_alpha: float = setting(0.0, "elastic distortion, max displacement in pixels along each axis, 0 = off",
                                   low=0, high=28, flag="--elastic")
    elastic_sigma: float = setting(4.0, "smoothness of the elastic field, pixels", low=0.5, high=28)

    @property
    def enabled(self):
        return any((self.rotate_deg, self.scale, self.shear, self.shift, self.elastic_alpha))


def affine_matrices(rotate_rad, scale, shear, shift_x, shift_y):
    """(B, 2, 3) matrices for `affine_grid`, from per-image parameters of shape (B,).

    affine_grid maps output coordinates to input ones in [-1, 1] units; the parameter
    distributions are symmetric, so drawing the inverse warp directly is equivalent.
    """
    cos, sin = torch.cos(rotate_rad), torch.sin(rotate_rad)
    inv_scale = 1.0 / scale
    theta = torch.stack([
        torch.stack([cos * inv_scale, (shear * cos - sin) * inv_scale, 2 * shift_x], dim=1),
        torch.stack([sin * inv_scale, (shear * sin + cos) * inv_scale, 2 * shift_y], dim=1),
    ], dim=1)
    return theta  # (B, 2, 3)


def _gaussian_kernel(sigma, device):
    radius = max(1, int(math.ceil(2 * sigma)))
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return kernel / kernel.sum(), radius


def elastic_offsets(batch, alpha, sigma, generator, device):
    """Smooth random displacement fields (B, 28, 28, 2) in grid units (Simard et al. 2003)."""
    field = torch.rand(batch * 2, 1, IMAGE_SIDE, IMAGE_SIDE, generator=generator, device=device) * 2 - 1
    kernel, radius = _gaussian_kernel(sigma, device)
    field = F.conv2d(field, kernel.view(1, 1, 1, -1), padding=(0, radius))  # separable blur
    field = F.conv2d(field, kernel.view(1, 1, -1, 1), padding=(radius, 0))
    field = field / field.abs().amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)
    pixels_to_grid = 2.0 / IMAGE_SIDE
    return (field * alpha * pixels_to_grid).view(batch, 2, IMAGE_SIDE, IMAGE_SIDE).permute(0, 2, 3, 1)


def augment(images, config: AugmentConfig, generator):
    """Randomly warp a batch of float images (B, 1, 28, 28) on their own device."""
    if not config.enabled:
        return images
    batch, device = images.shape[0], images.device

    def uniform(limit):  # (B,) in [-limit, limit]
        return (torch.rand(batch, generator=generator, device=device) * 2 - 1) * limit

    theta = affine_matrices(
        rotate_rad=uniform(math.radians(config.rotate_deg)),
        scale=1 + uniform(config.scale),
        shear=uniform(config.shear),
        shift_x=uniform(config.shift),
        shift_y=uniform(config.shift),
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (B, 28, 28, 2)
    if config.elastic_alpha > 0:
        grid = grid + elastic_offsets(batch, config.elastic_alpha, config.elastic_sigma, generator, device)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def warp(images, rotate_deg=0.0, shift_x_px=0.0, shift_y_px=0.0):
    """The same fixed warp for every image of a batch (used by test-time augmentation)."""
    batch, device = images.shape[0], images.device
    full = lambda value: torch.full((batch,), float(value), device=device)
    theta = affine_matrices(
        rotate_rad=full(math.radians(rotate_deg)),
        scale=full(1.0),
        shear=full(0.0),
        shift_x=full(shift_x_px / IMAGE_SIDE),
        shift_y=full(shift_y_px / IMAGE_SIDE),
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
