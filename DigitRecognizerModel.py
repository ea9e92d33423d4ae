"""The CNNs, their config, the architecture registry, and the one place checkpoints are
saved and loaded.

A checkpoint is a plain dict of tensors and Python types: it stores the model's config
(architecture name included) next to its weights, so `model_from_checkpoint` rebuilds
the network from the file alone, and every load uses `torch.load(..., weights_only=True)`
so a checkpoint can never run code.

Adding an architecture: a DigitCNN subclass whose `layers` builds its two parts (or any
nn.Module taking a ModelConfig of 3 widths and keeping it as `.config`, with fuse_batchnorm_
and, optionally, its own DEFAULT_WIDTHS and DEFAULT_DROPOUT), decorated with `@register("name")`; `--arch name`
then trains it and its checkpoints load.
"""

import io
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from cli import UserError, first_sentence, setting
from files import Kind, atomic_write_bytes, read_head

# Mean and std of MNIST pixels scaled to [0, 1]; the model normalises its own input so
# every caller feeds it plain [0, 1] images.
PIXEL_MEAN = 0.1307
PIXEL_STD = 0.3081
NUM_CLASSES = 10  # digits; a submission's Label is one of them
MAX_WIDTH = 1024  # channels per layer; far above anything useful on 28x28 digits
CNN_WIDTHS, CNN_DROPOUT = (16, 32, 128), 0.1  # the cnn's own widths and dropout, also the config's defaults

ARCHITECTURES = {}  # name -> nn.Module class taking a ModelConfig


def register(name):
    """Class decorator: make an architecture available as `--arch name`."""
    def add(cls):
        ARCHITECTURES[name] = cls
        return cls
    return add


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, corrupt, unsafe or for another model."""


@dataclass(frozen=True)
class ModelConfig:
    arch: str = setting("cnn", "architecture", choices=lambda: sorted(ARCHITECTURES))
    widths: tuple = setting(CNN_WIDTHS, "channels of the three stages (deotte: two conv stages, then its dense "
                                        "layer)", low=1, high=MAX_WIDTH)
    dropout: float = setting(CNN_DROPOUT, "dropout rate (cnn: before the classifier; deotte: after each stage "
                                          "and the dense layer)", low=0, high=1, high_open=True)
    num_classes: int = NUM_CLASSES


def conv_bn_relu(in_channels, out_channels, padding=1, kernel=3, stride=1):
    # No conv bias: the BatchNorm right after it has one.
    return [
        nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class DigitCNN(nn.Module):
    """What the architectures share: the config, input normalisation, `features` then
    `classifier`, and BatchNorm folding for inference. A subclass builds the two
    nn.Sequential parts from `config.widths` (three numbers) and `config.dropout`.

    Input: float images in [0, 1], shape (N, 1, 28, 28). Output: logits (N, classes).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if len(config.widths) != 3:
            raise ValueError(f"the {config.arch} architecture takes 3 widths, got {len(config.widths)}")
        self.config = config
        self.features, self.classifier = self.layers(*config.widths, config.dropout, config.num_classes)

    def forward(self, images):
        x = (images - PIXEL_MEAN) / PIXEL_STD
        return self.classifier(self.features(x))

    @torch.no_grad()
    def fuse_batchnorm_(self):
        """For inference only: fold each BatchNorm into the conv or linear layer before it, in
        place, so the separate normalisation passes over the activations vanish (see bench.py)."""
        self.eval()
        for part in (self.features, self.classifier):
            layers = list(part)
            for i, (layer, norm) in enumerate(zip(layers, layers[1:])):
                if isinstance(layer, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                    part[i], part[i + 1] = fuse_conv_bn_eval(layer, norm), nn.Identity()
                elif isinstance(layer, nn.Linear) and isinstance(norm, nn.BatchNorm1d):
                    part[i], part[i + 1] = fuse_linear_bn_eval(layer, norm), nn.Identity()
        return self


@register("cnn")
class DigitRecognizerModel(DigitCNN):
    """Two conv-conv-pool stages and a valid 3x3 conv, then a linear classifier.
    At widths (16, 32, 128): 86k parameters, 5.6M multiply-adds per image."""
    DEFAULT_WIDTHS, DEFAULT_DROPOUT = CNN_WIDTHS, CNN_DROPOUT

    @staticmethod
    def layers(c1, c2, c3, dropout, num_classes):
        features = nn.Sequential(
            *conv_bn_relu(1, c1), *conv_bn_relu(c1, c1), nn.MaxPool2d(2),  # (N, c1, 14, 14)
            *conv_bn_relu(c1, c2), *conv_bn_relu(c2, c2), nn.MaxPool2d(2),  # (N, c2, 7, 7)
            *conv_bn_relu(c2, c3, padding=0),  # (N, c3, 5, 5)
        )
        classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c3 * 25, num_classes))  # (N, c3*25)
        return features, classifier


@register("deotte")
class KaggleCNN(DigitCNN):
    """The CNN of Chris Deotte's 15-net Kaggle ensemble (0.99757), in PyTorch: strided 5x5
    convolutions instead of pooling, heavy dropout, a dense layer. widths (w1, w2, dense):
    two valid 3x3 convs and a stride-2 5x5 conv at w1, the same at w2. 326k parameters."""
    DEFAULT_WIDTHS, DEFAULT_DROPOUT = (32, 64, 128), 0.4

    @staticmethod
    def layers(w1, w2, dense, dropout, num_classes):
        features = nn.Sequential(
            *conv_bn_relu(1, w1, padding=0), *conv_bn_relu(w1, w1, padding=0),  # (N, w1, 24, 24)
            *conv_bn_relu(w1, w1, kernel=5, stride=2, padding=2), nn.Dropout(dropout),  # (N, w1, 12, 12)
            *conv_bn_relu(w1, w2, padding=0), *conv_bn_relu(w2, w2, padding=0),  # (N, w2, 8, 8)
            *conv_bn_relu(w2, w2, kernel=5, stride=2, padding=2), nn.Dropout(dropout),  # (N, w2, 4, 4)
        )
        classifier = nn.Sequential(
            nn.Flatten(),  # (N, w2 * 16)
            nn.Linear(w2 * 16, dense, bias=False), nn.BatchNorm1d(dense), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(dense, num_classes),
        )
        return features, classifier


def own_defaults(arch) -> dict:
    """{'widths', 'dropout'}: what architecture `arch` declares for itself (DEFAULT_WIDTHS,
    DEFAULT_DROPOUT), for `--arch` and `--mix` when the user gives neither."""
    cls = ARCHITECTURES[arch]
    declared = {"widths": "DEFAULT_WIDTHS", "dropout": "DEFAULT_DROPOUT"}
    return {name: getattr(cls, attribute) for name, attribute in declared.items() if hasattr(cls, attribute)}


def build_model(config: ModelConfig) -> nn.Module:
    """The registered architecture `config.arch`, built from `config`."""
    if config.arch not in ARCHITECTURES:
        raise CheckpointError(f"unknown architecture '{config.arch}'; known: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[config.arch](config)


def config_from_dict(values: dict) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    if not isinstance(values, dict):
        raise ValueError(f"its model config is a {type(values).__name__}, not a dict")
    if set(values) - known:
        raise CheckpointError(f"its model config has fields this version does not know "
                              f"{sorted(map(str, set(values) - known))}: written by a newer version? update this code")
    values = dict(values)
    if "widths" in values:
        values["widths"] = tuple(values["widths"]) if isinstance(values["widths"], (list, tuple)) else values["widths"]
    config = ModelConfig(**values)
    if not _is_whole(config.num_classes) or config.num_classes != NUM_CLASSES:
        raise ValueError(f"it predicts {config.num_classes!r} classes, not the {NUM_CLASSES} digits")
    if not (isinstance(config.widths, tuple) and all(_is_whole(w) and 1 <= w <= MAX_WIDTH for w in config.widths)):
        raise ValueError(f"widths {config.widths!r} are not whole numbers 1-{MAX_WIDTH}")
    dropout = config.dropout
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:  # NaN too
        raise ValueError(f"dropout {dropout!r} is not a probability 0 to 1")
    return config


def _is_whole(value):
    return isinstance(value, int) and not isinstance(value, bool)


# torch.save's zip, whose first entry pickles save_checkpoint's dict: 'model_config' first, a dict
CHECKPOINT = Kind("a checkpoint", b"PK\x03\x04", (b"}q\x00(X\x0c\x00\x00\x00model_configq\x01}q\x02(X",))


def save_checkpoint(path, model, **extra):
    """Write {'model_config', 'model', **extra} to `path` atomically (temp file + rename).

    Serialized in memory first (a few MB): torch.save writing to the disk itself reports a
    full disk or a file size limit as one vague RuntimeError; this way it is the OSError
    that names the cause, an OutputError naming `path`, and the old file stays.
    """
    state = {"model_config": asdict(model.config), "model": model.state_dict(), **extra}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


# torch's weights_only refusal is a paragraph; this finds its sentence naming the refused
# global or pickle opcode, e.g. "Unsupported global: GLOBAL posix.system ...".
_REFUSAL_REASON = re.compile(r"((?:Unsupported|Trying to load unsupported)\b.*?)(?:\.\s|\.?$)", re.MULTILINE)


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint dict safely, or raise CheckpointError with one clear line."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: checkpoint not found; train one with `python main.py` first")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory; pass the checkpoint file, e.g. {path}/best.pt")
    if not os.path.isfile(path):  # reading a pipe would wait for a writer forever
        raise CheckpointError(f"{path}: is a device, pipe or socket, not a checkpoint file; pass a best.pt")
    _check_records(path)
    not_a_checkpoint = (f"{path}: not a checkpoint (its bytes are not a saved PyTorch file); pass a best.pt or "
                        f"last.pt written by this suite")
    try:
        head = read_head(path)
    except OSError as e:
        raise CheckpointError(f"{path}: not a readable checkpoint: {first_sentence(e)}") from None
    if head and not head.startswith((b"PK", b"\x80")):  # torch.save writes a zip (older torch: a pickle)
        raise CheckpointError(not_a_checkpoint)  # a CSV, an ONNX file, a picture
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; errors say enough
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = _REFUSAL_REASON.search(str(e))
        reason = found.group(1) if found else "the weights-only loader refused it"
        raise CheckpointError(
            f"{path}: refused to load: not plain tensors and Python types, so unsafe or corrupted "
            f"({reason}); only use checkpoints written by this suite"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupted?): {first_sentence(e)}") from None
    except (IndexError, KeyError, TypeError, AttributeError, AssertionError, OverflowError):  # other bytes (a
        raise CheckpointError(not_a_checkpoint) from None  # crafted pickle)
    except MemoryError:
        raise CheckpointError(f"{path}: needs more memory than is free to load; not a checkpoint of this suite's "
                              f"size (a few MB)") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or "model_config" not in state:
        raise CheckpointError(f"{path}: not a checkpoint written by this suite (no model config and weights)")
    if not isinstance(state.get("identity", {}), dict):  # the recipe it was trained with, read by inference
        raise CheckpointError(f"{path}: not a checkpoint written by this suite (its recipe is not a dict)")
    return state


def _check_records(path):
    """CheckpointError for a zip that torch.save did not write: no pickle record, or compressed
    records (torch.save stores them as they are), which torch.load would inflate whatever
    their size: a 1 MB file can hold gigabytes of zeros."""
    damaged = f"{path}: damaged ({{}}); use another copy, or train again"
    try:
        if not zipfile.is_zipfile(path):
            return  # not a zip (torch's older format): torch.load judges
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            if not any(r.filename.endswith("/data.pkl") for r in records):
                raise CheckpointError(f"{path}: is a zip but not a PyTorch checkpoint (no data.pkl in it); pass a "
                                      f"best.pt or last.pt written by this suite")
            if any(r.compress_type != zipfile.ZIP_STORED for r in records):
                raise CheckpointError(f"{path}: its records are compressed, which torch.save never does, so it was "
                                      f"repacked or crafted; pass the file torch.save wrote")
            if any(r.is_dir() or r.external_attr & 0x10 for r in records):  # torch.load reads a "folder" as empty
                raise CheckpointError(damaged.format("a record is marked as a folder, which torch.save never writes"))
            # torch.load skips the CRCs torch.save wrote, so a changed weight would load; all 0: written
            # with torch's CRCs turned off, nothing to check
            bad_record = None if all(r.CRC == 0 for r in records) else archive.testzip()
    except (OSError, zipfile.BadZipFile):
        return  # unreadable, or no zip after all: torch.load says what it is
    except (RuntimeError, NotImplementedError, EOFError, ValueError) as e:  # a flipped flag reads as "encrypted"
        raise CheckpointError(damaged.format(first_sentence(e))) from None
    if bad_record:
        raise CheckpointError(damaged.format(f"the CRC of its record {bad_record} does not match"))


def model_from_checkpoint(state: dict, path="checkpoint") -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights.

    The config is checked against the stored tensors on the meta device first (no memory),
    so a config that claims huge layers fails before anything is allocated.
    """
    try:
        config = config_from_dict(state["model_config"])
        with torch.device("meta"):
            expected = build_model(config).state_dict()  # shapes and dtypes, no memory
        _check_weights(state["model"], expected)
        model = build_model(config)
        model.load_state_dict(state["model"])
    except CheckpointError as e:  # an unknown architecture: name the file too
        raise CheckpointError(f"{path}: {e}") from None
    except (RuntimeError, TypeError, ValueError, KeyError, AttributeError) as e:
        reason = first_sentence(e, skip="Error(s) in loading")  # then the first mismatch
        raise CheckpointError(f"{path}: cannot be used: {reason}; use a checkpoint written by this suite") from None
    return model


def _check_weights(stored, expected):
    """ValueError unless `stored` holds exactly the named tensors of `expected` (a meta model's
    state_dict), of its shapes and kinds of dtype, finite, with no negative BatchNorm variance."""
    not_tensor = next((key for key, value in stored.items()
                       if not (isinstance(key, str) and isinstance(value, torch.Tensor))), None)
    if not_tensor is not None:
        raise ValueError(f"{not_tensor!r} in its weights is not a named tensor ({type(stored[not_tensor]).__name__})")
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:  # before any tensor is read: an extra one may be a huge (stride-0) view
        raise ValueError(f"its weights hold {unexpected[0]!r}, which the config's model does not have")
    for key, meta in expected.items():
        tensor = stored.get(key)
        if tensor is None or tensor.shape != meta.shape:
            found = "missing" if tensor is None else tuple(tensor.shape)
            raise ValueError(f"{key} is {found}, the config needs {tuple(meta.shape)}")
        if tensor.is_floating_point() != meta.is_floating_point() or tensor.is_complex():
            raise ValueError(f"{key} holds {str(tensor.dtype).removeprefix('torch.')} values, the model "
                             f"{str(meta.dtype).removeprefix('torch.')}")
    if any(t.is_floating_point() and not torch.isfinite(t).all() for t in stored.values()):
        raise ValueError("its weights hold NaN or Inf values (a diverged run?)")
    if any(key.endswith("running_var") and (value < 0).any() for key, value in stored.items()):
        raise ValueError("its BatchNorm running variances hold negative values (a damaged file?)")


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
