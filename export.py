"""Export trained checkpoint(s) to one ONNX graph, checked against onnxruntime.

Usage:
    pip install -r requirements-export.txt      # onnx + onnxruntime: optional, only this needs them
    python export.py --checkpoint checkpoints/best.pt --output model.onnx
    python export.py --checkpoint checkpoints/best.pt --output model.onnx --input ../shared/data/digit-recognizer.zip
    python export.py --checkpoint checkpoints/member*/best.pt --output ensemble.onnx   # one graph, mean softmax
    python export.py --checkpoint checkpoints/best.pt --check 0                        # no parity check

The graph takes float32 images (N, 1, 28, 28) scaled to [0, 1] (pixel / 255) as input
`images` and returns class probabilities (N, 10) as `probabilities`: the softmax, averaged
over the members for several checkpoints. The batch axis is dynamic. Each model is
exported in eval mode with its BatchNorms folded into the convolutions, and scores each
image once: as `inference.py --no-tta`, without the shifted and rotated views of TTA that
the default and best recipes submit with (a note says so), so a few labels can differ from
the submission's. Before the file is written, onnxruntime's probabilities on --check images are
compared with torch's; a difference above --tolerance, or a differing label, writes
nothing and exits 1. Use it without torch, e.g. on test.csv rows `pixels` (N, 784) uint8:

    import numpy as np, onnxruntime
    session = onnxruntime.InferenceSession("model.onnx", providers=["CPUExecutionProvider"])
    probabilities = session.run(None, {"images": pixels.reshape(-1, 1, 28, 28).astype(np.float32) / 255})[0]
    labels = probabilities.argmax(1)
"""

import importlib
import io
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn as nn

from DigitRecognizerModel import NUM_CLASSES
from cli import ArgumentParser, UserError, path_argument, ranged, run_command
from dataloader import find_data, iter_digit_csv, source_files
from files import Kind, atomic_write_bytes, check_outputs
from inference import eval_batch_size, load_each_once, predict_probs

OPSET = 17
INSTALL_HINT = "pip install -r requirements-export.txt (or: pip install onnx onnxruntime)"
BATCH_SIZE = eval_batch_size(torch.device("cpu"))  # as the torch CPU path, so the speeds compare


class MissingExtra(UserError):
    """An optional package this command needs is not installed."""


def require(*names):
    """Import the optional packages `names`, or MissingExtra naming the missing ones and how to install."""
    modules, missing = [], []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtra(f"ONNX export needs {' and '.join(missing)}, optional packages not in "
                           f"requirements.txt: {INSTALL_HINT}")
    return modules


# ModelProto's first fields: ir_version (tag 0x08), the producer, then the graph's first node, named by its module
ONNX_GRAPH = Kind("an ONNX graph", b"\x08", (b"pytorch", b"/members.0/"))


class ParityError(Exception):
    """The exported graph does not reproduce torch's output."""


class SoftmaxEnsemble(nn.Module):
    """Class probabilities: the softmax of each member, averaged (as inference.predict_probs)."""

    def __init__(self, models):
        super().__init__()
        self.members = nn.ModuleList(models)

    def forward(self, images):
        return torch.stack([member(images).softmax(1) for member in self.members]).mean(0)


def to_onnx(models, opset=OPSET) -> bytes:
    """The serialised ONNX graph of `models` (eval mode, BatchNorm folded) averaged as one."""
    onnx, = require("onnx")
    module = SoftmaxEnsemble([m.cpu() for m in models]).eval()
    buffer = io.BytesIO()
    # The TorchScript exporter (dynamo=False) needs only `onnx`; the default dynamo exporter
    # also needs onnxscript and took ~20x longer here for the same graph and parity.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notice; torch is pinned
        torch.onnx.export(module, (torch.zeros(2, 1, 28, 28),), buffer, input_names=["images"],
                          output_names=["probabilities"], opset_version=opset, dynamo=False,
                          dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}})
    graph = buffer.getvalue()
    onnx.checker.check_model(onnx.load_from_string(graph))
    return graph


def session(graph, threads=None):
    """An onnxruntime CPU session for a serialised graph or a .onnx path, on `threads` threads
    (default: torch's count, so the two paths compare on the same cores)."""
    onnxruntime, = require("onnxruntime")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    return onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def onnx_probabilities(sess, images, batch_size=BATCH_SIZE):
    """Probabilities (N, classes) float32 numpy for uint8 images (N, 1, 28, 28), in batches."""
    outputs = [sess.run(None, {"images": images[start:start + batch_size].numpy().astype(np.float32) / 255})[0]
               for start in range(0, len(images), batch_size)]
    return np.concatenate(outputs) if outputs else np.zeros((0, NUM_CLASSES), np.float32)


def parity(models, sess, images):
    """{'images', 'max_abs_diff', 'labels_agree', 'real_disagreements'}: onnxruntime against torch."""
    expected = predict_probs(models, images, torch.device("cpu")).numpy()
    got = onnx_probabilities(sess, images)
    differ = expected.argmax(1) != got.argmax(1)
    top2 = np.sort(expected, 1)[:, -2:]
    return {"images": len(images), "max_abs_diff": float(np.abs(expected - got).max(initial=0.0)),
            "labels_agree": int((~differ).sum()),
            # a label flip between two classes within float noise of each other is a tie, not an error
            "real_disagreements": int((differ & (top2[:, 1] - top2[:, 0] > 1e-6)).sum())}


def onnx_throughput(sess, images, batch_size=BATCH_SIZE):
    """Images/s of onnxruntime on `images` (uint8, converted per batch as the torch path does)."""
    onnx_probabilities(sess, images[:batch_size])  # warm-up
    started = time.perf_counter()
    onnx_probabilities(sess, images, batch_size)
    return len(images) / (time.perf_counter() - started)


def onnxruntime_images_per_s(models, images):
    """For bench.py: onnxruntime's CPU img/s for `models` on `images`, None without onnx/onnxruntime."""
    try:
        return onnx_throughput(session(to_onnx(models)), images)
    except MissingExtra:
        return None


def check_images(input_path, count, seed=0):
    """`count` images: the first rows of a test CSV (file, folder or zip), else synthetic strokes."""
    if input_path:
        chunks, rows = [], 0
        for images, _ in iter_digit_csv(input_path, "test.csv", labelled=False, log=lambda *_: None):
            chunks.append(images)
            rows += len(images)
            if rows >= count:
                break
        return torch.cat(chunks)[:count]
    # Random blobs, not plain noise: noise gives near-uniform probabilities, i.e. ties.
    generator = torch.Generator().manual_seed(seed)
    blobs = torch.rand(count, 1, 7, 7, generator=generator).pow(3)
    return nn.functional.interpolate(blobs, size=28, mode="bilinear").mul(255).to(torch.uint8)


def parse_args(argv):
    parser = ArgumentParser(description="Export checkpoint(s) to one ONNX graph of class probabilities and "
                                        "check it against onnxruntime (needs: " + INSTALL_HINT + ").")
    parser.add_argument("--checkpoint", nargs="+", action="extend", required=True, metavar="PATH",
                        type=path_argument,
                        help="one or more checkpoints (the flag may repeat); several become one graph that outputs "
                             "the mean of their softmax probabilities (required)")
    parser.add_argument("--output", default="model.onnx",
                        help="ONNX file to write; input `images` (N, 1, 28, 28) float in [0, 1], output "
                             "`probabilities` (N, 10) (default: model.onnx)")
    parser.add_argument("--input", default=None, type=path_argument,
                        help="test.csv, a folder holding it, or the Kaggle zip, whose first rows are the "
                             "parity-check images (default: none, synthetic images)")
    parser.add_argument("--check", type=ranged(int, 0, 100_000), default=1000, metavar="N",
                        help="parity-check onnxruntime against torch on N images, up to 100,000; 0 = no check "
                             "(default: 1000)")
    parser.add_argument("--tolerance", type=ranged(float, 1e-12, 1), default=1e-4,
                        help="largest allowed probability difference in the check (default: 1e-4)")
    parser.add_argument("--opset", type=int, default=OPSET, choices=range(13, 24), metavar="13-23",
                        help=f"ONNX opset version; the exporter here writes 13 to 23 (default: {OPSET})")
    args = parser.parse_args(argv)
    if not args.output.lower().endswith(".onnx"):  # so a typo cannot replace some other file of the user's
        parser.error(f"--output {args.output}: an ONNX file's name ends in .onnx, e.g. model.onnx")
    return args


def run(args, log=print):
    """Export, check, then write; returns the parity figures (None without a check)."""
    if args.input is not None:
        args.input = find_data(args.input, names=("test.csv",))
    check_outputs([("--output", args.output, ONNX_GRAPH)],
                  [*args.checkpoint, *source_files(args.input or "", "test.csv")])
    require("onnx", *(["onnxruntime"] if args.check else []))  # before loading anything
    states, models = load_each_once(args.checkpoint, torch.device("cpu"))
    if any(state.get("identity", {}).get("tta") is True for state in states):
        log("note: these checkpoints' recipe submits with TTA; the graph scores each image once, as "
            "`inference.py --no-tta`, so a few labels can differ from the submission's")
    graph = to_onnx(models, args.opset)
    result = None
    if args.check:
        result = parity(models, session(graph), check_images(args.input, args.check))
        log(f"parity on {result['images']:,} {'test' if args.input else 'synthetic'} images: max |p_onnx - p_torch| "
            f"{result['max_abs_diff']:.2e}, labels identical on {result['labels_agree']:,}/{result['images']:,}")
        if not result["max_abs_diff"] <= args.tolerance or result["real_disagreements"]:  # NaN fails too
            raise ParityError(f"onnxruntime disagrees with torch beyond --tolerance {args.tolerance:g} "
                              f"(max difference {result['max_abs_diff']:.2e}, "
                              f"{result['real_disagreements']} differing labels); {args.output} not written")
    atomic_write_bytes(args.output, graph)
    log(f"wrote {args.output} ({len(graph) / 1e6:.2f} MB, {len(models)} model(s), opset {args.opset})")
    return result


def main(argv=None) -> int:
    return run_command(run, parse_args(argv), failures=ParityError)


if __name__ == "__main__":
    sys.exit(main())
