"""Benchmark: CSV loading, training throughput and GFLOP/s against the CPU's FMA peak,
time-to-accuracy, inference speed, peak memory. A benchmark, not a test: nothing asserts.

Usage:
    python bench.py --data ../shared/data/digit-recognizer.zip           # default preset: a default run's time (~7 min)
    python bench.py --data ../shared/data/digit-recognizer.zip --quick   # fast preset, about a minute

Prints a table and writes the same figures to bench.json.
"""

import json
import os
import platform
import resource
import sys
import tempfile
import time

import torch
import torch.nn as nn

from DigitRecognizerModel import build_model, count_parameters
from cli import ArgumentParser, choose_device, path_argument, run_command
from dataloader import (DataError, DigitDataset, find_data, load_test, load_train, names_read_as_data, source_files,
                        stratified_split)
from export import onnxruntime_images_per_s
from files import Kind, atomic_write_text, check_outputs
from inference import load_models, predict_file, predict_probs, training_precision
from recipe import VAL_FRACTION, preset
from trainer import BatchSource, train, train_step

FP32_FLOPS_PER_CYCLE = {"AVX512": 64, "AVX2": 32}  # 2 FMA units x SIMD lanes x 2 FLOPs
STEPS = 60  # timed training steps, after 5 warm-up steps
MIN_TRAIN_ROWS = (5 + STEPS) * 128 + 1  # ... at batch 128
RESULTS = Kind("a bench.py result", b'{\n  "preset": ')  # write_results's json.dumps, indent 2


def multiply_adds_per_image(model):
    """Multiply-adds of one forward pass, counted from the conv and linear layer shapes."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * module.in_channels // module.groups * kh * kw
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 1, 28, 28))
    for hook in hooks:
        hook.remove()
    return total


def cpu_peak():
    """Estimated fp32 FMA peak: cores x clock x FLOP/cycle, plus an sgemm measurement."""
    capability = torch.backends.cpu.get_cpu_capability()
    flops_per_cycle, simd = FP32_FLOPS_PER_CYCLE.get(capability, 16), capability
    cpuinfo = {}
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpuinfo = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in f)}
    mhz = float(cpuinfo.get("cpu MHz", 0.0))  # the last core's; 0 where not listed (often on ARM)
    if capability == "AVX512" and cpuinfo.get("vendor_id") == "AuthenticAMD" and cpuinfo.get("cpu family") == "25":
        flops_per_cycle, simd = flops_per_cycle // 2, "AVX512 on Zen 4's 256-bit units"  # two halves per op
    cores = torch.get_num_threads()
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    started = time.perf_counter()
    for _ in range(5):
        a @ b
    sgemm = 5 * 2 * 2048 ** 3 / (time.perf_counter() - started) / 1e9
    return {
        "cpu": platform.processor() or platform.machine(),
        "simd": capability,
        "threads": cores,
        "clock_ghz": mhz / 1000,
        "flops_per_cycle": flops_per_cycle,
        "peak_gflops": cores * mhz / 1000 * flops_per_cycle or None,
        "derivation": f"{cores} threads x {mhz / 1000:.2f} GHz (/proc/cpuinfo's nominal clock) x {flops_per_cycle} "
                      f"FLOP/cycle "
                      f"({simd}: 2 FMA units x {flops_per_cycle // 4} fp32 lanes x 2)" if mhz else
                      "unknown: /proc/cpuinfo lists no clock",
        "sgemm_gflops": sgemm,
    }


def train_step_throughput(recipe, dataset, device, steps=STEPS):
    """Images/s of the bare training step (augmentation, forward, backward, SGD update)."""
    model = build_model(recipe.model).to(device).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    batches = BatchSource(dataset, recipe.train.batch_size, recipe.augment, seed=0, device=device,
                          max_steps=5 + steps).epoch(0)
    for _, (images, labels) in zip(range(5), batches):  # warm-up: oneDNN picks its kernels on the first calls
        train_step(model, optimizer, images, labels, recipe.train.label_smoothing, device)
    started, timed = time.perf_counter(), 0
    for images, labels in batches:
        train_step(model, optimizer, images, labels, recipe.train.label_smoothing, device)
        timed += 1
    return timed * recipe.train.batch_size / (time.perf_counter() - started)


def first_time_reaching(history, target):
    elapsed = 0.0
    for row in history:
        elapsed += row["seconds"]
        if row["val_accuracy"] >= target:
            return round(elapsed, 1)
    return None


def train_step_figures(recipe, full, device, peak_gflops):
    """The model's size and the bare training step's speed, against the FMA peak when known."""
    probe = build_model(recipe.model)
    macs = multiply_adds_per_image(probe)
    step_rate = train_step_throughput(recipe, full, device)
    gflops = step_rate * 3 * 2 * macs / 1e9  # forward + backward (2x forward), 2 FLOPs a multiply-add
    return {"model": {"arch": recipe.model.arch, "widths": list(recipe.model.widths),
                      "multiply_adds_per_image": macs, "parameters": count_parameters(probe)},
            "train_step_images_per_s": step_rate, "train_step_gflops": gflops,
            "train_step_fraction_of_peak": gflops / peak_gflops if peak_gflops else None}


def run(args):
    args.data = find_data(args.data)
    inputs = source_files(args.data, "train.csv") + source_files(args.data, "test.csv")
    check_outputs([("--output", args.output, RESULTS)], inputs, names_read_as_data(args.data))
    device = choose_device("cpu")
    recipe = preset("fast" if args.quick else "default")
    results = {"preset": "fast" if args.quick else "default", "torch": torch.__version__, "machine": cpu_peak()}

    started = time.perf_counter()
    images, labels = load_train(args.data)
    results["load_train_s"] = time.perf_counter() - started
    started = time.perf_counter()
    test_images = load_test(args.data)
    results["load_test_s"] = time.perf_counter() - started
    if len(labels) < MIN_TRAIN_ROWS:
        raise DataError(f"{args.data}: {len(labels):,} train.csv rows; bench.py times whole epochs and "
                        f"{STEPS} training steps, so it needs {MIN_TRAIN_ROWS:,} or more: use the full Kaggle data")

    full = DigitDataset(images, labels)
    machine = results["machine"]
    # A clock that boosts above the nominal one lets sgemm beat the estimate: the higher is the peak.
    peak = max(machine["peak_gflops"], machine["sgemm_gflops"]) if machine["peak_gflops"] else None
    results.update(train_step_figures(recipe, full, device, peak))
    results["train_precision"] = training_precision(device)
    train_idx, val_idx = stratified_split(labels, VAL_FRACTION, seed=0)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as checkpoint_dir:
        history = train(build_model(recipe.model), full.subset(train_idx), full.subset(val_idx), recipe, device,
                        checkpoint_dir, log=lambda *_: None, progress=False)
        epoch_seconds = [row["seconds"] for row in history]
        results["epochs"] = len(history)
        results["seconds_per_epoch"] = sum(epoch_seconds) / len(epoch_seconds)
        results["epoch_images_per_s"] = len(train_idx) / results["seconds_per_epoch"]
        results["final_val_accuracy"] = history[-1]["val_accuracy"]  # the submitted (last) epoch
        results["seconds_to_0.990"] = first_time_reaching(history, 0.990)
        results["seconds_to_0.995"] = first_time_reaching(history, 0.995)

        models = load_models([os.path.join(checkpoint_dir, "best.pt")], device)
        started = time.perf_counter()
        predictions = predict_file(models, args.data, device, log=lambda *_: None)
        results["read_and_predict_test_s"] = time.perf_counter() - started
        started = time.perf_counter()
        predict_probs(models, test_images, device)
        results["predict_test_s"] = time.perf_counter() - started
        results["test_images"] = len(predictions)
        results["inference_images_per_s"] = len(predictions) / results["predict_test_s"]
        results["onnxruntime_images_per_s"] = onnxruntime_images_per_s(models, test_images)  # None: not installed
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is in KiB
    return results


def print_table(r):
    m = r["machine"]
    rows = [
        ("machine", f"{m['cpu']} {m['simd']}, {m['threads']} threads, torch {r['torch']}"),
        ("FMA peak (estimate)", f"{m['peak_gflops']:.0f} GFLOP/s = {m['derivation']}" if m["peak_gflops"]
         else m["derivation"]),
        ("sgemm 2048 (measured)", f"{m['sgemm_gflops']:.0f} GFLOP/s"),
        *([("", "above the estimate (a boost clock), so the train step's share of peak is of the sgemm")]
          if m["peak_gflops"] and m["sgemm_gflops"] > m["peak_gflops"] else []),
        ("model", f"{r['model']['arch']} widths {r['model']['widths']}, {r['model']['parameters']:,} params, "
                  f"{r['model']['multiply_adds_per_image'] / 1e6:.2f}M multiply-adds/image"),
        ("load train.csv", f"{r['load_train_s']:.2f} s"),
        ("load test.csv", f"{r['load_test_s']:.2f} s"),
        (f"train step ({r['train_precision']})",
         f"{r['train_step_images_per_s']:,.0f} img/s = {r['train_step_gflops']:.0f} GFLOP/s"
         + (f" ({100 * r['train_step_fraction_of_peak']:.0f}% of the fp32 peak)" if r["train_step_fraction_of_peak"]
            else "")),
        (f"epoch ({r['preset']} preset)", f"{r['seconds_per_epoch']:.1f} s ({r['epoch_images_per_s']:,.0f} img/s incl. validation)"),
        *((f"time to val acc {target} (training)", "not reached" if r[f"seconds_to_{target}"] is None
           else f"{r[f'seconds_to_{target}']} s") for target in ("0.990", "0.995")),
        (f"val acc after epoch {r['epochs']} (submitted)", f"{r['final_val_accuracy']:.4f}"),
        (f"predict {r['test_images']:,} test images", f"{r['predict_test_s']:.2f} s "
                                                      f"({r['inference_images_per_s']:,.0f} img/s)"),
        ("the same, onnxruntime (export.py)", "not installed (pip install -r requirements-export.txt)"
         if r["onnxruntime_images_per_s"] is None else f"{r['onnxruntime_images_per_s']:,.0f} img/s"),
        ("read + predict test file", f"{r['read_and_predict_test_s']:.2f} s"),
        ("peak RSS", f"{r['peak_rss_mib']:.0f} MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def main(argv=None) -> int:
    parser = ArgumentParser(description="Benchmark loading, training and inference on this machine.")
    parser.add_argument("--data", default=None, type=path_argument,
                        help="folder with train.csv and test.csv, or the Kaggle zip (default: the first of data/, "
                             "data/digit-recognizer.zip and /kaggle/input/digit-recognizer/ that holds them)")
    parser.add_argument("--quick", action="store_true", help="fast preset, about a minute (default: off)")
    parser.add_argument("--output", default="bench.json", help="JSON results (default: bench.json)")
    return run_command(lambda args: write_results(args.output, run(args)), parser.parse_args(argv))


def write_results(path, results):
    print_table(results)
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
