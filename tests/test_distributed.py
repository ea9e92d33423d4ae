"""torchrun with 2 CPU processes (gloo) against a plain single-process run, on synthetic data.

The synthetic classes (conftest.make_digits) are easy enough that two epochs of the fast
preset learn them, so both runs should reach the same accuracy.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

import main
import trainer
from DigitRecognizerModel import load_checkpoint, model_from_checkpoint
from conftest import ROOT, cli, make_digits, write_csv

TRAIN_ROWS, TEST_ROWS = 2000, 50
FLAGS = ["--preset", "fast", "--epochs", "2", "--batch-size", "32", "--widths", "8", "16", "32", "--report", "",
         "--device", "cpu"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_csv(folder / "train.csv", *make_digits(TRAIN_ROWS, seed=1))
    write_csv(folder / "test.csv", make_digits(TEST_ROWS, seed=2)[0])
    return folder


def train(data_dir, out, launcher, *extra, script="main.py", ok=True):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    # One thread per process: the test compares accuracy, and two threads on a busy
    # 2-core machine spin-wait (10x slower here).
    env["OMP_NUM_THREADS"] = "1"
    command = launcher + [script, "--data", str(data_dir), "--checkpoint-dir", str(out / "ck"),
                          "--submission", str(out / "sub.csv"), *FLAGS, *extra]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ok is None or (result.returncode == 0) == ok, result.stdout + result.stderr  # None: the caller checks
    return result


COUNTING_THREADS = """
import os
import sys
sys.path.insert(0, {root!r})
import main
import trainer
run_epoch = trainer.Trainer.run_epoch


def run_or_stop(self, epoch, bar):
    if epoch == {stop_at_epoch}:  # on every process: Ctrl-C reaches them all, and so does a bug
        raise {error}
    return run_epoch(self, epoch, bar)


def threads():  # the process's native threads, gloo's among them
    return len(os.listdir("/proc/self/task"))


trainer.Trainer.run_epoch = run_or_stop
before = threads()
try:
    code = main.main()
finally:  # before the traceback of an error
    print(f"threads before main(): {{before}}, after: {{threads()}}", file=sys.stderr, flush=True)
sys.exit(code)
"""


def main_counting_threads(folder, stop_at_epoch=-1, error="KeyboardInterrupt"):
    """A script that runs main.py's main(), raising `error` as epoch `stop_at_epoch` (0-based) starts,
    then prints its thread counts before and after main()."""
    script = folder / "main_counting_threads.py"
    script.write_text(COUNTING_THREADS.format(root=ROOT, stop_at_epoch=stop_at_epoch, error=error))
    return str(script)


def assert_no_thread_left(output):
    """main() left each process as it found it: gloo's worker threads stopped. One left running
    could let go of a tensor while Python shuts down, which aborts the process (SIGABRT) after a
    run that wrote everything: torchrun then fails, and so does the user's job."""
    counts = re.findall(r"threads before main\(\): (\d+), after: (\d+)", output)
    assert len(counts) == 2, output  # one line from each process
    assert all(before == after for before, after in counts), output


@pytest.fixture(scope="module")
def whole_run(data_dir, tmp_path_factory):
    """(folder, result) of one uninterrupted 2-process run of main.py's main(), which tests compare
    against; a test that changes files copies the folder first. Each process then prints its
    thread counts before and after main()."""
    out = tmp_path_factory.mktemp("whole")
    return out, train(data_dir, out, TORCHRUN, script=main_counting_threads(out))


def test_two_processes_match_one(data_dir, whole_run, tmp_path, capsys):
    ddp, result = whole_run
    single = tmp_path / "single"
    assert cli(capsys, main, "--data", data_dir, "--checkpoint-dir", single / "ck", "--submission", single / "sub.csv",
               *FLAGS)[0] == 0

    # Rank 0 alone writes: one checkpoint set, one history, one submission, one log.
    assert sorted(os.listdir(ddp / "ck")) == ["best.pt", "history.csv", "last.pt"]
    assert len((ddp / "sub.csv").read_text().splitlines()) == TEST_ROWS + 1
    assert len((ddp / "ck" / "history.csv").read_text().splitlines()) == 3
    assert result.stdout.count("validation accuracy of the submitted predictor") == 1
    assert "in each of 2 processes" in result.stdout

    # Checkpoints hold the unwrapped model: they load in plain single-process inference.
    best = load_checkpoint(str(ddp / "ck" / "best.pt"))
    assert not any(key.startswith("module.") for key in best["model"])
    model_from_checkpoint(best)

    single = load_checkpoint(str(single / "ck" / "best.pt"))
    assert single["val_accuracy"] > 0.9
    assert abs(best["val_accuracy"] - single["val_accuracy"]) <= 0.03


LINUX_PROC = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in Linux's /proc")


@LINUX_PROC
def test_no_thread_outlives_main_under_torchrun(whole_run):
    assert_no_thread_left(whole_run[1].stderr)


@LINUX_PROC
def test_no_thread_outlives_a_bugs_traceback_under_torchrun(data_dir, tmp_path):
    """The traceback's frames hold the DDP model, and through it the process group."""
    crashed = train(data_dir, tmp_path, TORCHRUN, ok=False,
                    script=main_counting_threads(tmp_path, stop_at_epoch=1, error='RuntimeError("a bug")'))
    assert "RuntimeError: a bug" in crashed.stderr
    assert_no_thread_left(crashed.stderr)


def test_two_processes_interrupted_then_resumed_match_the_uninterrupted_run(data_dir, whole_run, tmp_path):
    whole = whole_run[0]
    cut = tmp_path / "cut"
    stopped = train(data_dir, cut, TORCHRUN, script=main_counting_threads(tmp_path, stop_at_epoch=1), ok=False)
    assert "interrupted; resume with" in stopped.stderr
    assert_no_thread_left(stopped.stderr)
    assert load_checkpoint(str(cut / "ck" / "last.pt"))["epoch"] == 1
    resumed = train(data_dir, cut, TORCHRUN, "--resume")
    assert "after epoch 1/2" in resumed.stdout
    for name in ("best.pt", "last.pt"):
        state, reference = load_checkpoint(str(cut / "ck" / name)), load_checkpoint(str(whole / "ck" / name))
        assert all(torch.equal(state["model"][k], reference["model"][k]) for k in reference["model"]), name
    assert (cut / "sub.csv").read_bytes() == (whole / "sub.csv").read_bytes()


NOTEBOOK = """
import atexit
import os
import sys
sys.path.insert(0, {root!r})
from main import run

# Registered first, so it runs last as Python shuts down: the native threads left then, gloo's among them.
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
atexit.register(lambda: print(f"threads before: {{before}}, at exit: {{threads()}}", flush=True))
# A notebook cell run three times under torchrun (the later calls keep the process group the first
# joined): a dry run, a real run, then resume=True of that finished run into another submission.
for n, settings in enumerate([dict(dry_run=True, folds=2, pseudo_label=0.5), {{}}, dict(resume=True)]):
    results = run(data={data!r}, checkpoint_dir={out!r} + f"/ck{{min(n, 1)}}", submission={out!r} + f"/sub{{n}}.csv",
                  preset="fast", epochs=1, batch_size=32, widths=(8, 16, 32), report=False, device="cpu",
                  **settings)
    print(f"run {{n}} ok", flush=True)  # one write: the two processes share stdout
"""


@pytest.fixture(scope="module")
def notebook_run(data_dir, tmp_path_factory):
    """(folder, stdout) of one torchrun of three run() calls in each process: a dry run, a real run,
    and a resume of the finished real run. Each test checks its own call ("run N ok" from both
    processes): a call that fails fails its own test and those of the calls after it."""
    out = tmp_path_factory.mktemp("notebook")
    script = out / "notebook.py"
    script.write_text(NOTEBOOK.format(root=ROOT, data=str(data_dir), out=str(out)))
    return out, train(data_dir, out / "unused", TORCHRUN, script=str(script), ok=None).stdout


def test_a_dry_run_under_torchrun_evaluates_on_rank_0_and_shares_its_pseudo_labels(notebook_run):
    """Each rank's dry run has a temporary folder of its own, as ranks on two machines have two
    disks: only rank 0, which wrote the best.pt files, reads them; round 2 trains on its pseudo-labels."""
    out, stdout = notebook_run
    assert stdout.count("run 0 ok") == 2  # both processes
    assert stdout.count("dry run: everything worked") == 1 and stdout.count("pseudo-labels: ") == 1
    assert not (out / "ck0").exists() and not (out / "sub0.csv").exists()


def test_run_twice_in_one_torchrun_process(notebook_run):
    out, stdout = notebook_run
    assert stdout.count("run 1 ok") == 2
    assert (out / "sub1.csv").exists() and len(pd.read_csv(out / "ck1" / "history.csv")) == 1


@LINUX_PROC
def test_run_under_torchrun_stops_its_threads_before_python_shuts_down(notebook_run):
    """run() keeps the process group for later calls; it is closed at exit, gloo's threads with it."""
    stdout = notebook_run[1]
    counts = re.findall(r"threads before: (\d+), at exit: (\d+)", stdout)
    assert len(counts) == 2 and all(before == after for before, after in counts), stdout  # one line from each process


def test_resuming_a_finished_run_only_writes_the_submission(notebook_run):
    """Every rank loads last.pt; the run is complete, so no rank trains and rank 0 writes the
    submission again. (A fresh launch that joins and restores: the interrupted run's test.)"""
    out, stdout = notebook_run
    assert stdout.count("run 2 ok") == 2 and stdout.count("resumed from") == 1
    before, after = stdout.rsplit("run 1 ok", 1)
    assert "train loss" in before and "train loss" not in after  # the real run's epoch line; none resumed
    assert (out / "sub2.csv").read_bytes() == (out / "sub1.csv").read_bytes()


def as_rank_1_of_2(monkeypatch):
    for name, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "localhost",
                        "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)


def test_a_torch_without_distributed_is_one_line(monkeypatch):
    """Some torch builds (USE_DISTRIBUTED=0) have no process groups at all."""
    as_rank_1_of_2(monkeypatch)
    monkeypatch.setattr(trainer.dist, "is_available", lambda: False)
    monkeypatch.setattr(trainer.dist, "init_process_group", lambda *_, **__: pytest.fail("tried to join"))
    with pytest.raises(trainer.UserError, match=r"^WORLD_SIZE=2 asks for several processes, but this torch build"):
        trainer.init_distributed(torch.device("cpu"))


def test_more_processes_than_gpus_is_one_line(monkeypatch):
    as_rank_1_of_2(monkeypatch)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(trainer.UserError, match=r"^LOCAL_RANK=1, but this machine shows 1 GPU\(s\); start at most 1"):
        trainer.init_distributed(torch.device("cuda"))


def test_batch_size_must_divide_over_processes(monkeypatch, capsys):
    for name, value in {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost",
                        "MASTER_PORT": "29500"}.items():  # as torchrun sets them
        monkeypatch.setenv(name, value)
    assert main.parse_args(["--batch-size", "129"])[1].train.batch_size == 129
    with pytest.raises(SystemExit) as exit_info:
        main.parse_args(["--batch-size", "128"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--batch-size 128 is the global batch; it must divide evenly over the 3 process" in err[0]


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_a_process_waiting_for_peers_that_never_come_stops_on_a_signal(data_dir, tmp_path, stop):
    """WORLD_SIZE set by hand with no peer: joining waits in native code, where a Python
    handler never runs; the signal must still stop it, leaving nothing behind."""
    with socket.socket() as probe:  # a free port for the rendezvous that nobody else joins
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "main.py", "--data", str(data_dir), "--checkpoint-dir",
                                str(tmp_path / "ck"), "--submission", str(tmp_path / "sub.csv"), *FLAGS], cwd=ROOT,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while process.poll() is None:  # until rank 0's rendezvous store listens: it is waiting for the peer
            with socket.socket() as client:
                if client.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        assert process.poll() is None, process.communicate()
        process.send_signal(getattr(signal, stop))
        process.wait(timeout=60)
    finally:
        process.kill()
    assert process.returncode == -getattr(signal, stop) and os.listdir(tmp_path) == []
