"""export.py: one ONNX graph (an ensemble averages its members) that onnxruntime runs as torch does."""

import sys

import numpy as np
import pytest
import torch

import export
from DigitRecognizerModel import DigitRecognizerModel, ModelConfig, save_checkpoint
from conftest import REAL_DATA, make_digits, write_csv
from inference import load_models, predict_probs

CPU = torch.device("cpu")


def _checkpoint(path, seed, widths=(16, 32, 128), **recipe):
    """A model with non-trivial BatchNorm statistics (so folding them matters) and confident outputs."""
    torch.manual_seed(seed)
    model = DigitRecognizerModel(ModelConfig(widths=widths))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    model.classifier[-1].weight.data.mul_(20)  # spread the logits: labels are not near-ties
    save_checkpoint(str(path), model, identity=recipe)
    return str(path)


def _check_input(tmp_path):
    """The real test.csv (its first 1,000 rows are read) when the real data is here, else synthetic."""
    if REAL_DATA is not None:
        return REAL_DATA
    return write_csv(tmp_path / "test.csv", make_digits(1000, seed=5)[0])


def test_onnx_matches_torch_on_1000_images(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    checkpoint, output = _checkpoint(tmp_path / "best.pt", seed=0), str(tmp_path / "model.onnx")
    lines = []
    result = export.run(export.parse_args(["--checkpoint", checkpoint, "--output", output,
                                           "--input", _check_input(tmp_path)]), log=lines.append)
    assert result["images"] == 1000 and result["max_abs_diff"] <= 1e-4 and result["labels_agree"] == 1000
    assert lines[0].startswith("parity on 1,000 test images: max |p_onnx - p_torch| ")
    assert lines[0].endswith("labels identical on 1,000/1,000") and lines[1].startswith(f"wrote {output}")

    graph = onnx.load(output)
    assert "BatchNormalization" not in {node.op_type for node in graph.graph.node}  # folded into the convs
    assert [i.name for i in graph.graph.input] == ["images"] and [o.name for o in graph.graph.output] == ["probabilities"]
    # The file itself, at a batch size other than the export's: a dynamic batch axis.
    images = make_digits(37, seed=6)[0]
    session = onnxruntime.InferenceSession(output, providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images.numpy().astype(np.float32) / 255})[0]
    expected = predict_probs(load_models([checkpoint], CPU), images, CPU).numpy()
    assert got.shape == (37, 10)
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("tta", [True, False])
def test_a_recipe_with_tta_gets_a_note_that_the_graph_has_none(tmp_path, tta):
    pytest.importorskip("onnx")
    checkpoint = _checkpoint(tmp_path / "best.pt", seed=0, tta=tta)
    lines = []
    export.run(export.parse_args(["--checkpoint", checkpoint, "--output", str(tmp_path / "m.onnx"), "--check", "0"]),
               log=lines.append)
    note = "note: these checkpoints' recipe submits with TTA; the graph scores each image once, as `inference.py --no-tta`"
    assert any(line.startswith(note) for line in lines) == tta and lines[-1].startswith("wrote ")


def test_ensemble_exports_as_one_graph_averaging_the_members(tmp_path):
    pytest.importorskip("onnxruntime")
    paths = [_checkpoint(tmp_path / f"m{seed}.pt", seed, widths=(4, 8, 8)) for seed in (1, 2)]
    output = str(tmp_path / "ensemble.onnx")
    assert export.main(["--checkpoint", *paths, "--output", output, "--check", "200"]) == 0
    images = make_digits(50, seed=7)[0]
    got = export.onnx_probabilities(export.session(output), images)
    members = [predict_probs(load_models([path], CPU), images, CPU).numpy() for path in paths]
    np.testing.assert_allclose(got, (members[0] + members[1]) / 2, atol=1e-5)  # the mean of the softmax
    assert np.abs(members[0] - members[1]).max() > 0.1  # so the mean differs from either member
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    assert export.main(["--checkpoint", paths[0], "--output", output, "--check", "0"]) == 0  # replaces its own file
    assert len(export.session(output).get_inputs()) == 1


@pytest.mark.parametrize("drift", [1e-3, float("nan")], ids=["drifting runtime", "NaN"])
def test_parity_failure_writes_nothing_and_exits_1(tmp_path, capsys, monkeypatch, drift):
    pytest.importorskip("onnxruntime")
    checkpoint, output = _checkpoint(tmp_path / "best.pt", seed=0, widths=(4, 8, 8)), tmp_path / "model.onnx"
    assert export.main(["--checkpoint", _checkpoint(tmp_path / "old.pt", seed=1, widths=(4, 8, 8)),
                        "--output", str(output), "--check", "0"]) == 0
    earlier = output.read_bytes()
    real = export.onnx_probabilities
    monkeypatch.setattr(export, "onnx_probabilities", lambda *a, **k: real(*a, **k) + drift)
    assert export.main(["--checkpoint", checkpoint, "--output", str(output), "--check", "100"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: onnxruntime disagrees with torch beyond --tolerance 0.0001")
    assert output.read_bytes() == earlier


@pytest.mark.parametrize("missing", ["onnx", "onnxruntime"])
def test_missing_optional_package_is_one_line_with_the_install_command(tmp_path, capsys, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import <missing>` raise ImportError
    checkpoint = _checkpoint(tmp_path / "best.pt", seed=0, widths=(4, 8, 8))
    assert export.main(["--checkpoint", checkpoint, "--output", str(tmp_path / "model.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: ONNX export needs {missing},") and err.count("\n") == 1
    assert "pip install -r requirements-export.txt" in err and "pip install onnx onnxruntime" in err
    assert not (tmp_path / "model.onnx").exists()
    assert export.onnxruntime_images_per_s(load_models([checkpoint], CPU), make_digits(10)[0]) is None  # bench: a blank


def test_refuses_an_output_that_is_an_input_a_folder_or_not_onnx(tmp_path, capsys):
    checkpoint = _checkpoint(tmp_path / "weights.onnx", seed=0, widths=(4, 8, 8))  # an input named like an output
    (tmp_path / "exports.onnx").mkdir()
    notes = tmp_path / "notes.txt"
    notes.write_text("the user's notes")
    before = open(checkpoint, "rb").read()
    (tmp_path / "latest.onnx").symlink_to(notes)
    for output, says in ((checkpoint, "is an input of this run"), (str(tmp_path / "exports.onnx"), "is a folder"),
                         (str(notes), "an ONNX file's name ends in .onnx"),
                         (str(tmp_path / "latest.onnx"), "would replace a file that is not an ONNX graph this suite")):
        try:
            code = export.main(["--checkpoint", checkpoint, "--output", output])
        except SystemExit as e:  # a bad command line: argparse exits
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and says in err and err.count("\n") == 1 and "Traceback" not in err
    assert open(checkpoint, "rb").read() == before and notes.read_text() == "the user's notes"


def test_onnxruntime_throughput_for_bench():
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    models = [DigitRecognizerModel(ModelConfig(widths=(4, 8, 8))).fuse_batchnorm_()]
    assert export.onnxruntime_images_per_s(models, make_digits(300)[0]) > 0
