"""Crash and resume: kill -9 at any moment, SIGINT and SIGTERM, then `--resume` with the same
flags finishes exactly as an uninterrupted run with the same seed would have (on CPU)."""

import os
import shlex
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

import inference
import main
import trainer
from DigitRecognizerModel import load_checkpoint
from conftest import ROOT, assert_user_error, cli, make_digits, snapshot, write_csv

EPOCHS = 4
FLAGS = ["--epochs", str(EPOCHS), "--batch-size", "16", "--seed", "7", "--device", "cpu"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same thread count as the one_thread fixture


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_csv(folder / "train.csv", *make_digits(200, seed=1))
    write_csv(folder / "test.csv", make_digits(30, seed=2)[0])
    return folder


def argv(data, out, *extra):
    return ["--data", str(data), "--checkpoint-dir", str(out / "ckpt"), "--submission", str(out / "sub.csv"),
            "--report", "", *FLAGS, *extra]


def command(data, out, *extra):
    return [sys.executable, os.path.join(ROOT, "main.py"), *argv(data, out, *extra)]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """An uninterrupted run with the same flags and seed, in this process (on one thread, as the
    runs in fresh processes): each test compares a fresh process's result with it, so the same
    seed gives the same weights and predictions in any process."""
    out = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main.main(argv(data, out)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def result(out):
    """What a run leaves: final and best weights, and the submission."""
    return (load_checkpoint(out / "ckpt" / "last.pt")["model"], load_checkpoint(out / "ckpt" / "best.pt")["model"],
            (out / "sub.csv").read_text())


def assert_same_result(out, reference):
    (last, best, submission), (ref_last, ref_best, ref_submission) = result(out), result(reference)
    for state, ref_state in ((last, ref_last), (best, ref_best)):
        assert state.keys() == ref_state.keys()
        assert all(torch.equal(state[k], ref_state[k]) for k in state), "weights differ from the uninterrupted run"
    assert submission == ref_submission


def epochs_done(out):
    """Completed epochs according to history.csv (written after last.pt), 0 before the first."""
    try:
        return len((out / "ckpt" / "history.csv").read_text().splitlines()) - 1
    except FileNotFoundError:
        return 0


def start_and_wait(data, out, until):
    """Start a training process and return it once `until(out)` holds; fail if it ends first."""
    process = subprocess.Popen(command(data, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.monotonic() + 300
    while not until(out):
        assert process.poll() is None, f"run ended first: {process.communicate()}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return process


def resume(capsys, *resume_argv):
    """Resume in this process (one thread, as the killed process had); returns its stdout."""
    code, stdout, err = cli(capsys, main, *resume_argv)
    assert (code, err) == (0, [])
    return stdout


def test_kill_9_in_the_first_epoch_then_resume_matches_an_uninterrupted_run(capsys, data, reference, tmp_path):
    # last.pt of epoch 0 is written just before training starts (after the first epoch: see the
    # SIGTERM test and the kill -9 while writing last.pt after epoch 2)
    process = start_and_wait(data, tmp_path, until=lambda out: (out / "ckpt" / "last.pt").exists())
    process.kill()
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    killed_after = load_checkpoint(tmp_path / "ckpt" / "last.pt")["epoch"]
    assert killed_after < EPOCHS
    stdout = resume(capsys, *argv(data, tmp_path, "--resume"))
    assert f"resumed from {tmp_path / 'ckpt' / 'last.pt'} after epoch {killed_after}/{EPOCHS}" in stdout
    assert epochs_done(tmp_path) == EPOCHS
    assert_same_result(tmp_path, reference)


# torch.save that SIGKILLs its own process halfway through writing last.pt after epoch 2.
KILL_WHILE_SAVING_EPOCH_2 = """
import os, signal, sys, torch
save, fsync, dying = torch.save, os.fsync, []
def save_and_mark(state, f):
    if state.get("epoch") == 2 and "optimizer" in state:  # epoch 2's last.pt
        dying.append(True)
    save(state, f)
def fsync_or_die(fd):  # its bytes are in the temp file, not yet synced and renamed
    if dying:
        os.kill(os.getpid(), signal.SIGKILL)
    fsync(fd)
torch.save, os.fsync = save_and_mark, fsync_or_die
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
import main
import trainer
sys.exit(main.main())
"""


def test_kill_9_while_writing_last_pt_then_resume_matches(capsys, data, reference, tmp_path):
    done = subprocess.run([sys.executable, "-c", KILL_WHILE_SAVING_EPOCH_2, *command(data, tmp_path)[1:]],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert load_checkpoint(tmp_path / "ckpt" / "last.pt")["epoch"] == 1  # the write cut off never replaced it
    assert any(name.startswith(".tmp-") for name in os.listdir(tmp_path / "ckpt"))  # it is there, aside
    resume(capsys, *argv(data, tmp_path, "--resume"))
    assert_same_result(tmp_path, reference)


def other_data(folder):
    write_csv(folder / "train.csv", *make_digits(200, seed=3))
    write_csv(folder / "test.csv", make_digits(30, seed=2)[0])
    return folder


RESUME_CHANGES = {  # case: (flags, data folder for (data, tmp_path), what the line must say)
    "--lr": (["--lr", "0.05"], lambda data, tmp: data, "(--lr 0.1, not --lr 0.05)"),
    "--ema": (["--ema", "0.9"], lambda data, tmp: data, "(--ema 0.0, not --ema 0.9)"),
    "--elastic": (["--elastic", "3"], lambda data, tmp: data, "(--elastic 0.0, not --elastic 3.0)"),
    "--widths": (["--widths", "8", "16", "32"], lambda data, tmp: data, "(--widths 16 32 128, not --widths 8 16 32)"),
    "--no-tta": (["--no-tta"], lambda data, tmp: data, "(--tta, not --no-tta)"),
    "other data": ([], lambda data, tmp: other_data(tmp), "(other data)"),
    "all at once": (["--lr", "0.05", "--no-tta"], lambda data, tmp: other_data(tmp),
                    "(--lr 0.1, not --lr 0.05; --tta, not --no-tta; other data)"),
}


@pytest.mark.parametrize("case", RESUME_CHANGES)
def test_resume_with_other_flags_or_data_is_refused(capsys, data, reference, tmp_path, case):
    flags, data_for, expected = RESUME_CHANGES[case]
    out = tmp_path / "copy"
    (out / "ckpt").mkdir(parents=True)
    (out / "ckpt" / "last.pt").write_bytes((reference / "ckpt" / "last.pt").read_bytes())
    before = snapshot(out)
    code, stdout, err = cli(capsys, main, *argv(data_for(data, tmp_path), out, "--resume", *flags))
    assert_user_error(code, err, out / "ckpt" / "last.pt", expected, "resume with the same data and flags")
    assert "epoch" not in stdout and snapshot(out) == before


def test_sigterm_leaves_a_resumable_run_and_says_how(capsys, data, reference, tmp_path):
    """SIGTERM stops like Ctrl-C (KeyboardInterrupt, tested in-process below), in a real process."""
    process = start_and_wait(data, tmp_path, until=lambda out: epochs_done(out) >= 1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    how = stderr.strip().splitlines()[-1]
    assert how.startswith("interrupted; resume with: python ")
    assert 1 <= load_checkpoint(tmp_path / "ckpt" / "last.pt")["epoch"] < EPOCHS
    python, script, *resume_argv = shlex.split(how.split("resume with: ", 1)[1])  # run what it says
    assert python == "python" and resume_argv[0] == "--resume"
    assert script == os.path.join(os.path.realpath(ROOT), "main.py")  # started outside the suite's folder
    resume(capsys, *resume_argv)
    assert_same_result(tmp_path, reference)


def test_a_run_stopped_between_last_pt_and_history_csv_resumes_to_the_whole_history(capsys, data, tmp_path,
                                                                                      monkeypatch):
    """Ctrl-C (or a full disk) after the last epoch's last.pt but before its history.csv row."""
    assert cli(capsys, main, *tiny_argv(data, tmp_path / "whole"))[0] == 0
    write_history = trainer.write_history

    def stopped_at_the_last_row(path, history):
        if len(history) == int(TINY[TINY.index("--epochs") + 1]):
            raise KeyboardInterrupt
        write_history(path, history)
    monkeypatch.setattr(trainer, "write_history", stopped_at_the_last_row)
    assert cli(capsys, main, *tiny_argv(data, tmp_path / "cut"))[0] == 130
    monkeypatch.undo()
    assert cli(capsys, main, *tiny_argv(data, tmp_path / "cut", "--resume"))[0] == 0
    rows = [pd.read_csv(tmp_path / run / "ckpt" / "history.csv").drop(columns="seconds") for run in ("whole", "cut")]
    assert len(rows[0]) == 2 and rows[0].equals(rows[1])


def test_printed_commands_name_the_script_so_they_run_from_where_the_run_started(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    assert main.command_path("main.py") == "main.py"
    monkeypatch.chdir(tmp_path)
    assert main.command_path("inference.py") == os.path.join(os.path.realpath(ROOT), "inference.py")
    assert os.path.isfile(main.command_path("inference.py"))


# ----------------------------------------------------------------------------- in-process interrupts, tiny models

TINY = ["--epochs", "2", "--batch-size", "32", "--widths", "4", "8", "8", "--report", "", "--seed", "3", "--device", "cpu"]


def tiny_argv(data, out, *extra):
    return ["--data", data, "--checkpoint-dir", out / "ckpt", "--submission", out / "sub.csv", *TINY, *extra]


def interrupt_at_epoch(monkeypatch, number):
    """Ctrl-C as the `number`-th epoch of the process starts (counting every member's epochs);
    returns the list of epochs actually started, which keeps growing afterwards."""
    started, run_epoch = [], trainer.Trainer.run_epoch

    def run_or_interrupt(self, epoch, bar):
        started.append(epoch)
        if len(started) == number:
            raise KeyboardInterrupt
        return run_epoch(self, epoch, bar)
    monkeypatch.setattr(trainer.Trainer, "run_epoch", run_or_interrupt)
    return started


def weights(path):
    state = load_checkpoint(path)
    return {f"{key}.{name}": t for key in ("model", "ema") if state.get(key) for name, t in state[key].items()}


def assert_same_weights(path, reference_path):
    state, reference_state = weights(path), weights(reference_path)
    assert state.keys() == reference_state.keys()
    assert all(torch.equal(state[k], reference_state[k]) for k in state), f"{path} differs from {reference_path}"


def test_ema_and_elastic_run_end_to_end_and_resume_exactly(capsys, data, tmp_path, monkeypatch):
    flags = ["--ema", "0.9", "--elastic", "3"]
    assert cli(capsys, main, *tiny_argv(data, tmp_path / "whole", *flags))[0] == 0
    whole = tmp_path / "whole" / "ckpt"
    saved = load_checkpoint(whole / "last.pt")
    assert saved["ema"] and (saved["identity"]["ema"], saved["identity"]["elastic_alpha"]) == (0.9, 3.0)
    interrupt_at_epoch(monkeypatch, 2)
    code, _, err = cli(capsys, main, *tiny_argv(data, tmp_path / "cut", *flags))
    assert code == 130 and err[-1].startswith(f"interrupted; resume with: python {os.path.realpath(ROOT)}/main.py --resume ")
    monkeypatch.undo()
    code, stdout, err = cli(capsys, main, *tiny_argv(data, tmp_path / "cut", *flags, "--resume"))
    assert (code, err) == (0, []) and "after epoch 1/2" in stdout
    for name in ("last.pt", "best.pt"):  # best.pt holds the EMA weights
        assert_same_weights(tmp_path / "cut" / "ckpt" / name, whole / name)
    assert (tmp_path / "cut" / "sub.csv").read_bytes() == (tmp_path / "whole" / "sub.csv").read_bytes()


def test_a_fresh_run_that_fails_at_once_keeps_the_earlier_best_pt(capsys, data, tmp_path, monkeypatch):
    """The earlier last.pt goes (a --resume must not continue it), its best.pt stays until replaced."""
    assert cli(capsys, main, *tiny_argv(data, tmp_path))[0] == 0
    best = (tmp_path / "ckpt" / "best.pt").read_bytes()

    def diverge(self, epoch, bar):
        raise trainer.TrainingDiverged("loss became nan in epoch 1; lower --lr")
    monkeypatch.setattr(trainer.Trainer, "run_epoch", diverge)
    assert cli(capsys, main, *tiny_argv(data, tmp_path))[0] == 1
    assert (tmp_path / "ckpt" / "best.pt").read_bytes() == best
    assert load_checkpoint(tmp_path / "ckpt" / "last.pt")["epoch"] == 0  # this run's, not the earlier run's


def test_an_earlier_members_checkpoint_that_is_a_link_stays_a_link(capsys, data, tmp_path):
    assert cli(capsys, main, *tiny_argv(data, tmp_path, "--ensemble", "2"))[0] == 0
    link, target = tmp_path / "ckpt" / "member2" / "best.pt", tmp_path / "kept" / "best.pt"
    target.parent.mkdir()
    link.rename(target)
    link.symlink_to(target)
    assert cli(capsys, main, *tiny_argv(data, tmp_path, "--ensemble", "2", "--seed", "1"))[0] == 0
    assert link.is_symlink() and load_checkpoint(target)["identity"]["seed"] == 2  # member 2 of seed 1


def test_a_write_that_fails_mid_run_says_how_to_resume_once_fixed(capsys, data, tmp_path, monkeypatch):
    """A full disk after epoch 1: the error line, then the resume command; a plain rerun would start over."""
    from files import OutputError
    run_epoch = trainer.Trainer.run_epoch

    def fill_the_disk_in_epoch_2(self, epoch, bar):
        if epoch == 1:
            raise OutputError(f"{self.paths['last.pt']}: cannot write: the disk is full; free space or choose "
                              f"another location")
        return run_epoch(self, epoch, bar)
    monkeypatch.setattr(trainer.Trainer, "run_epoch", fill_the_disk_in_epoch_2)
    code, _, err = cli(capsys, main, *tiny_argv(data, tmp_path))
    assert code == 2 and err[0].startswith("error: ") and "the disk is full" in err[0]
    assert err[-1].startswith(f"the epochs done are kept; once that is fixed, resume with: python "
                              f"{os.path.realpath(ROOT)}/main.py --resume ")
    monkeypatch.undo()
    code, stdout, err = cli(capsys, main, *shlex.split(err[-1].split("main.py ")[1]))
    assert (code, err) == (0, []) and "after epoch 1/2" in stdout


def test_resumed_ensemble_continues_the_member_cut_off_and_starts_the_ones_never_begun(capsys, data, tmp_path,
                                                                                       monkeypatch):
    flags = ["--ensemble", "3"]
    assert cli(capsys, main, *tiny_argv(data, tmp_path / "whole", *flags))[0] == 0
    interrupt_at_epoch(monkeypatch, 4)  # member 1: epochs 1-2, member 2: epoch 1, then Ctrl-C
    assert cli(capsys, main, *tiny_argv(data, tmp_path / "cut", *flags))[0] == 130
    cut = tmp_path / "cut" / "ckpt"
    assert [load_checkpoint(cut / m / "last.pt")["epoch"] for m in ("member1", "member2")] == [2, 1]
    assert not (cut / "member3").exists()
    monkeypatch.undo()
    started = interrupt_at_epoch(monkeypatch, 0)  # 0: never, just count
    code, stdout, err = cli(capsys, main, *tiny_argv(data, tmp_path / "cut", *flags, "--resume"))
    assert (code, err) == (0, [])
    assert started == [1, 0, 1]  # member 2's second epoch, then all of member 3; nothing done twice
    assert f"resumed from {cut / 'member2' / 'last.pt'} after epoch 1/2" in stdout
    for member in ("member1", "member2", "member3"):
        assert_same_weights(cut / member / "last.pt", tmp_path / "whole" / "ckpt" / member / "last.pt")
    assert (tmp_path / "cut" / "sub.csv").read_bytes() == (tmp_path / "whole" / "sub.csv").read_bytes()


def test_resume_in_a_folder_an_earlier_run_used_continues_this_run_only(capsys, data, tmp_path, monkeypatch):
    """The members not yet begun when this run was cut off still hold the earlier run's last.pt:
    a fresh run removes those, so --resume starts them instead of refusing their recipe."""
    assert cli(capsys, main, *tiny_argv(data, tmp_path / "whole", "--ensemble", "2", "--epochs", "3"))[0] == 0
    assert cli(capsys, main, *tiny_argv(data, tmp_path / "cut", "--ensemble", "2", "--epochs", "1"))[0] == 0
    interrupt_at_epoch(monkeypatch, 2)  # the 3-epoch run, cut off in member 1's second epoch
    assert cli(capsys, main, *tiny_argv(data, tmp_path / "cut", "--ensemble", "2", "--epochs", "3"))[0] == 130
    assert not any((tmp_path / "cut" / "ckpt" / "member2").iterdir())  # no best.pt of the earlier run beside this one's
    monkeypatch.undo()
    code, _, err = cli(capsys, main, *tiny_argv(data, tmp_path / "cut", "--ensemble", "2", "--epochs", "3", "--resume"))
    assert (code, err) == (0, [])
    for member in ("member1", "member2"):
        assert_same_weights(tmp_path / "cut" / "ckpt" / member / "last.pt",
                            tmp_path / "whole" / "ckpt" / member / "last.pt")
    assert (tmp_path / "cut" / "sub.csv").read_bytes() == (tmp_path / "whole" / "sub.csv").read_bytes()


def test_a_run_of_another_shape_names_the_earlier_runs_checkpoints_and_keeps_them(capsys, data, tmp_path):
    """A single model's best.pt beside an ensemble's member*/ (or the reverse, or a round2/ without
    --pseudo-label) would be what `inference.py --checkpoint checkpoints/best.pt` rebuilds; deleting
    them would lose an unfinished run that --resume could still finish."""
    ck = tmp_path / "run" / "ckpt"
    assert cli(capsys, main, *tiny_argv(data, tmp_path / "run", "--pseudo-label", "0.5"))[0] == 0
    before = snapshot(ck)
    code, out, _ = cli(capsys, main, *tiny_argv(data, tmp_path / "run", "--ensemble", "2"))
    assert code == 0 and f"note: {ck} also holds an earlier run's checkpoints of another shape, not this run's " \
                          f"(best.pt, last.pt, history.csv, round2/best.pt, round2/last.pt, round2/history.csv); " \
                          f"they stay" in out
    assert out.rstrip().splitlines()[-1].startswith("the same file from the checkpoints alone: ")
    assert {name: snapshot(ck)[name] for name in before} == before
    code, out, _ = cli(capsys, main, *tiny_argv(data, tmp_path / "run"))
    assert code == 0 and "member1/best.pt, member1/last.pt" in out
    (tmp_path / "link").symlink_to(tmp_path / "run")
    code, out, _ = cli(capsys, main, *tiny_argv(data, tmp_path / "link"))  # through a link to the folder
    assert code == 0 and "member1/best.pt, member1/last.pt" in out


def test_a_last_pt_from_before_momentum_set_the_schedule_resumes_with_the_same_flags(capsys, data, tmp_path,
                                                                                      monkeypatch):
    """Such a file records --momentum 0.9 (then the default, and inert) and a 0.95 -> 0.85 schedule."""
    assert cli(capsys, main, *tiny_argv(data, tmp_path / "whole"))[0] == 0
    interrupt_at_epoch(monkeypatch, 2)
    assert cli(capsys, main, *tiny_argv(data, tmp_path / "cut"))[0] == 130
    monkeypatch.undo()
    last = tmp_path / "cut" / "ckpt" / "last.pt"
    state = torch.load(last, weights_only=True)
    state["identity"]["momentum"] = 0.9
    torch.save(state, last)
    code, stdout, err = cli(capsys, main, *tiny_argv(data, tmp_path / "cut", "--resume"))
    assert (code, err) == (0, []) and "after epoch 1/2" in stdout
    assert_same_weights(tmp_path / "cut" / "ckpt" / "last.pt", tmp_path / "whole" / "ckpt" / "last.pt")


def test_resuming_a_finished_run_puts_back_a_deleted_history_csv(capsys, data, tmp_path):
    assert cli(capsys, main, *tiny_argv(data, tmp_path))[0] == 0
    history = (tmp_path / "ckpt" / "history.csv").read_bytes()
    (tmp_path / "ckpt" / "history.csv").unlink()
    assert cli(capsys, main, *tiny_argv(data, tmp_path, "--resume"))[0] == 0
    assert (tmp_path / "ckpt" / "history.csv").read_bytes() == history


def test_resume_without_a_finished_members_best_pt_says_so(capsys, data, tmp_path):
    assert cli(capsys, main, *tiny_argv(data, tmp_path, "--ensemble", "2"))[0] == 0
    best = tmp_path / "ckpt" / "member1" / "best.pt"
    best.unlink()
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, main, *tiny_argv(data, tmp_path, "--ensemble", "2", "--resume"))
    assert_user_error(code, err, best, "missing, though", "member1/last.pt has 2 epochs done; put it back, or "
                                                          "train again without --resume")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("during", ["reading", "the start of training"])
@pytest.mark.parametrize("earlier_run", [False, True], ids=["fresh folder", "an earlier run's last.pt there"])
def test_interrupt_before_the_first_checkpoint_says_to_start_again(capsys, data, tmp_path, monkeypatch, earlier_run,
                                                                   during):
    """...and leaves no folder it made: the checkpoint folder exists only once it holds something."""
    if earlier_run:  # not this run's: --resume would continue (or refuse) that one
        assert cli(capsys, main, *tiny_argv(data, tmp_path))[0] == 0
    before = snapshot(tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    # Ctrl-C while reading the CSVs, or once the checkpoint folder is locked (and made)
    monkeypatch.setattr(main, "load_data" if during == "reading" else "train_rounds", interrupted)
    code, _, err = cli(capsys, main, *tiny_argv(data, tmp_path))
    assert code == 130
    assert err[-1] == "interrupted before the first checkpoint; start again with the same command"
    if earlier_run and during != "reading":  # a fresh run removes an earlier run's resume point first
        del before["ckpt/last.pt"]  # and keeps its best.pt until it has its own
    assert snapshot(tmp_path) == before and (earlier_run or not (tmp_path / "ckpt").exists())


def test_resuming_in_another_precision_says_the_run_mixes_them(capsys, data, tmp_path, monkeypatch):
    """Begun where bf16 is native (a Zen 4 or later CPU, an Ampere GPU), resumed where it is not, then
    where it is again: last.pt remembers that its epochs mixed the two."""
    def epochs_on(native, *extra, stop_at=0):
        monkeypatch.undo()
        monkeypatch.setattr(inference, "computes_bf16", lambda device: native)
        if stop_at:
            interrupt_at_epoch(monkeypatch, stop_at)
        code, stdout, _ = cli(capsys, main, *tiny_argv(data, tmp_path, "--epochs", "3", *extra))
        assert code == (130 if stop_at else 0)
        return stdout, load_checkpoint(tmp_path / "ckpt" / "last.pt")["training_precision"]

    assert epochs_on(True, stop_at=2)[1] == "bf16"  # epoch 1 done
    stdout, precision = epochs_on(False, "--resume", stop_at=2)  # epoch 2 done
    assert "after epoch 1/3; its epochs so far trained in bf16, the rest train in float32 on this machine" in stdout
    assert precision == "mixed"
    stdout, precision = epochs_on(True, "--resume")
    assert "after epoch 2/3; its epochs so far trained in both bf16 and float32, the rest train in bf16" in stdout
    assert precision == "mixed"
    stdout, _ = epochs_on(False, "--resume")  # finished: nothing left to train, nothing to say
    assert "after epoch 3/3\n" in stdout
