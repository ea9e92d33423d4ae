"""bench.py's arithmetic (the benchmark itself measures; it asserts nothing)."""

import bench
from bench import first_time_reaching, multiply_adds_per_image
from conftest import assert_user_error, cli, snapshot
from DigitRecognizerModel import DigitRecognizerModel, ModelConfig


def test_multiply_adds_are_counted_from_layer_shapes():
    c1, c2, c3 = 4, 8, 16
    expected = (28 * 28 * 9 * (1 * c1 + c1 * c1)  # two 3x3 convs at 28x28
                + 14 * 14 * 9 * (c1 * c2 + c2 * c2)  # two at 14x14
                + 5 * 5 * 9 * c2 * c3  # valid 3x3 conv, 7x7 -> 5x5
                + c3 * 25 * 10)  # classifier
    assert multiply_adds_per_image(DigitRecognizerModel(ModelConfig(widths=(c1, c2, c3)))) == expected


def test_time_to_accuracy_adds_epoch_seconds_until_the_target():
    history = [{"seconds": 10.0, "val_accuracy": 0.98}, {"seconds": 9.0, "val_accuracy": 0.991},
               {"seconds": 9.5, "val_accuracy": 0.9952}]
    assert first_time_reaching(history, 0.990) == 19.0
    assert first_time_reaching(history, 0.995) == 28.5
    assert first_time_reaching(history, 0.999) is None


def test_bench_refuses_to_write_over_its_input_and_data_too_small_to_time(kaggle_dir, capsys):
    before = snapshot(kaggle_dir)
    code, _, err = cli(capsys, bench, "--data", kaggle_dir, "--output", kaggle_dir / "train.csv")
    assert_user_error(code, err, "--output", "is an input of this run")
    code, _, err = cli(capsys, bench, "--data", kaggle_dir, "--output", kaggle_dir / "test.csv.gz")
    assert_user_error(code, err, "--output", "later runs would read it as the test data in")
    code, _, err = cli(capsys, bench, "--quick", "--data", kaggle_dir, "--output", "bench.json")
    assert_user_error(code, err, "train.csv rows; bench.py times whole epochs")
    assert snapshot(kaggle_dir) == before
