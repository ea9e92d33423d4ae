"""The train/eval loop: SGD with a one-cycle LR schedule, label smoothing, checkpoints, resume.

The whole training set lives on the device as one uint8 tensor; `BatchSource` cuts each
epoch's `randperm` into batch slices and augments each batch on the device. Every epoch's
shuffle, augmentation and dropout are seeded from (seed, epoch), so a run resumed from
`last.pt` repeats exactly what the uninterrupted run would have done.

Under torchrun (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel: every
rank draws the same per-epoch permutation and trains on its own equal slice of it, with
its own augmentation and dropout; `batch_size` stays the global batch. Validation is
sharded too and its sums all-reduced; only rank 0 writes files.
"""

import atexit
import contextlib
import copy
import hashlib
import math
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from DigitRecognizerModel import CheckpointError, load_checkpoint, save_checkpoint
from cli import (UserError, as_typed, first_sentence, flag_name, flatten_settings, launched_world_size, setting,
                 setting_fields)
from dataloader import AugmentConfig, DigitDataset, augment
from files import Kind, atomic_write_text
from inference import autocast, eval_batch_size, predict_logits, training_precision

if dist.is_available():
    # DDP's first use imports this module, whose functions take the process group that exists
    # then as a default argument: imported after a group is joined, they keep it, and gloo's
    # worker threads, alive past destroy_process_group, and a worker that lets go of a tensor
    # while Python shuts down aborts the process ("terminate called without an active
    # exception"). Imported now, before any group, they hold None.
    import torch.distributed.nn.functional  # noqa: F401

MAX_EPOCHS = 1000  # an epoch's random numbers come from seed * MAX_EPOCHS + epoch
HISTORY_COLUMNS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds"]
HISTORY = Kind("a history.csv", (",".join(HISTORY_COLUMNS) + "\n").encode())


class TrainingDiverged(Exception):
    """The loss, the weights or the BatchNorm statistics became NaN or Inf."""


MOMENTUM_DIP = 0.1  # the one-cycle momentum falls from --momentum to this much below it as the LR peaks


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = setting(30, "epochs", low=1, high=MAX_EPOCHS)
    batch_size: int = setting(128, "global batch size, split evenly over torchrun processes", low=2, high=65_536)
    lr: float = setting(0.1, "peak learning rate of the one-cycle schedule", low=1e-6, high=100)
    momentum: float = setting(0.95, f"peak SGD Nesterov momentum; the one-cycle schedule lowers it by {MOMENTUM_DIP} "
                                    f"while the LR is high", low=MOMENTUM_DIP, high=1, high_open=True)
    weight_decay: float = setting(5e-4, "L2 weight decay", low=0, high=1)
    label_smoothing: float = setting(0.1, "label smoothing of the training loss", low=0, high=1, high_open=True)
    warmup: float = setting(0.2, "share of the steps spent rising to the peak LR", low=0.01, high=0.99)
    ema: float = setting(0.0, "weight EMA decay per step, 0 = off", low=0, high=1, high_open=True)
    best_epoch: bool = setting(False, "submit the epoch with the best validation accuracy, not the last; its "
                                      "validation figure is then optimistic (picked on those images)")


# ----------------------------------------------------------------------------- processes

def init_distributed(device):
    """Join torchrun's process group when WORLD_SIZE > 1; returns this process's device.

    Plain `python main.py` (no WORLD_SIZE) gets no process group and the device unchanged. A
    second run in one process (run() twice in a notebook under torchrun) keeps the group it
    joined: joining torchrun's store again can hang.
    """
    world_size = launched_world_size()
    if world_size == 1:
        return device
    if not dist.is_available():
        raise UserError(f"WORLD_SIZE={world_size} asks for several processes, but this torch build has no "
                        f"torch.distributed; run one process (unset WORLD_SIZE), or install a torch that has it")
    if device.type == "cuda":
        local_rank, gpus = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if local_rank >= gpus:  # torch.cuda.set_device would fail with "invalid device ordinal"
            raise UserError(f"LOCAL_RANK={local_rank}, but this machine shows {gpus} GPU(s); start at most {gpus} "
                            f"process(es) per machine (--nproc_per_node), or check CUDA_VISIBLE_DEVICES")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if dist.is_initialized():  # joined, threads shared out, by an earlier run here
        return device
    # torch obeys OMP_NUM_THREADS, which torchrun sets to 1 when it starts several processes
    # per node (unless the user set it); without it, the node's cores are shared out.
    if "OMP_NUM_THREADS" not in os.environ:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, torch.get_num_threads() // local_processes))
    # Joining waits for the peers inside native code, where no Python handler (Ctrl-C's
    # KeyboardInterrupt, SIGTERM as one) ever runs: the default actions stop it at once.
    # Nothing is written yet.
    handlers = {number: signal.signal(number, signal.SIG_DFL) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    except (RuntimeError, ValueError) as e:  # e.g. no peer joined within torch's timeout
        raise UserError(f"could not join the torchrun processes at {os.environ['MASTER_ADDR']}:"
                        f"{os.environ['MASTER_PORT']} ({first_sentence(e)}); start them with torchrun") from None
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    # run() keeps the group for a later run in this process; it is closed before Python shuts
    # down, while a gloo worker letting go of its last tensors can still take the GIL.
    atexit.register(close_distributed)
    return device


def wait_for_peers():
    """Each rank waits until every rank gets here (nothing without a process group): after a
    run, every rank returns once rank 0 has written its files."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def close_distributed():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def drop_traceback_locals(error):
    """Under a process group, clear the locals of the frames in `error`'s traceback; it prints
    the same. They hold the DDP model, so the group and gloo's threads would outlive
    close_distributed, and a gloo thread at work as Python shuts down aborts the process."""
    if dist.is_available() and dist.is_initialized():
        traceback.clear_frames(error.__traceback__)


def share_from_rank_0(tensor, device):
    """`tensor` as rank 0 holds it, on every rank (each passes one of the same shape and dtype);
    `tensor` itself without a process group. nccl sends device tensors, so it travels on `device`."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    shared = tensor.to(device)
    dist.broadcast(shared, src=0)
    return shared.to(tensor.device)


def rank_and_world_size():
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _sum_over_ranks(values, device):
    """A float64 tensor of the numbers in `values`, each summed over the ranks."""
    total = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total


# ----------------------------------------------------------------------------- batches

class BatchSource:
    """This rank's augmented training batches, epoch by epoch.

    `for images, labels in batches.epoch(e):` gives float (B, 1, 28, 28) channels-last
    images and int64 (B,) labels. Each epoch's permutation is seeded from (seed, epoch)
    and the same on every rank, which takes its own equal shard of it; augmentation and
    dropout are seeded per rank. The last partial batch is dropped.
    """

    def __init__(self, dataset: DigitDataset, batch_size, augment_config: AugmentConfig, seed, device,
                 max_steps=0):
        self.dataset, self.augment_config, self.seed, self.device = dataset, augment_config, seed, device
        self.rank, world_size = rank_and_world_size()
        # Equal disjoint shards, so every rank runs the same number of steps; with the global
        # batch split evenly, the step count and LR schedule do not depend on the world size.
        self.batch_size, self.shard_size = batch_size // world_size, len(dataset) // world_size
        self.steps = max(1, self.shard_size // self.batch_size)
        if max_steps:
            self.steps = min(self.steps, max_steps)

    def epoch(self, epoch):
        epoch_seed = self.seed * MAX_EPOCHS + epoch  # epoch < MAX_EPOCHS: no two (seed, epoch) pairs share one
        rank_seed = epoch_seed + (self.rank << 32)  # == epoch_seed on rank 0 and in a single process
        torch.manual_seed(rank_seed)  # dropout
        generator = torch.Generator(device=self.device).manual_seed(epoch_seed)
        order = torch.randperm(len(self.dataset), generator=generator, device=self.device)  # same on every rank
        order = order[self.rank * self.shard_size:(self.rank + 1) * self.shard_size]
        if self.rank:
            generator.manual_seed(rank_seed)  # augmentation differs per rank
        for step in range(self.steps):
            batch = order[step * self.batch_size:(step + 1) * self.batch_size]
            images = self.dataset.images[batch].float().div_(255)  # (B, 1, 28, 28) uint8 -> [0, 1]
            images = augment(images, self.augment_config, generator).contiguous(memory_format=torch.channels_last)
            yield images, self.dataset.labels[batch]


def train_step(net, optimizer, images, labels, label_smoothing, device):
    """One SGD step: forward, backward, update. Returns (loss, number correct) as device
    tensors, so the loop never waits on them."""
    with autocast(device, training=True):
        logits = net(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.argmax(1) == labels).sum()


class EMA:
    """Exponential moving average of a model's weights (buffers copied as they are)."""

    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        ema_params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, list(model.parameters()), 1 - self.decay)
        for ema_buffer, buffer in zip(self.model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)


# ----------------------------------------------------------------------------- evaluation

def evaluate(model, dataset: DigitDataset, device, max_batches=0):
    """{'loss', 'accuracy', 'count'} on a labelled dataset (NaN loss and accuracy when empty)."""
    images, labels = dataset.images, dataset.labels
    if max_batches:
        limit = max_batches * eval_batch_size(device)
        images, labels = images[:limit], labels[:limit]
    logits = predict_logits(model, images, device)  # (N, classes)
    labels = labels.to(logits.device)
    return {"loss": F.cross_entropy(logits, labels).item(),
            "accuracy": (logits.argmax(1) == labels).float().mean().item(), "count": len(labels)}


def validate(model, val_shard: DigitDataset, device, max_batches=0):
    """{'loss', 'accuracy'} over every rank's disjoint validation shard (each image once)."""
    _, world_size = rank_and_world_size()
    if world_size > 1:  # the ranks' last BatchNorm updates differ: evaluate rank 0's, which is saved
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    val = evaluate(model, val_shard, device, max_batches)
    if world_size == 1:
        return {"loss": val["loss"], "accuracy": val["accuracy"]}
    count = val["count"]
    total = _sum_over_ranks([val["loss"] * count, val["accuracy"] * count, count] if count else [0.0] * 3, device)
    loss, accuracy = (total[:2] / total[2]).tolist()  # NaN when the validation set is empty
    return {"loss": loss, "accuracy": accuracy}


# ----------------------------------------------------------------------------- checkpoints

def data_fingerprint(*datasets: DigitDataset) -> str:
    """A short hash of the images and labels, so --resume can tell another dataset apart."""
    digest = hashlib.sha1()
    for dataset in datasets:
        digest.update(dataset.images.cpu().numpy().tobytes())
        digest.update(dataset.labels.cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def write_history(path, history):
    lines = [",".join(HISTORY_COLUMNS)]
    for row in history:
        lines.append(",".join(_fmt(row[c]) for c in HISTORY_COLUMNS))
    atomic_write_text(path, "\n".join(lines) + "\n")


def _fmt(value):
    return str(value) if isinstance(value, int) else f"{value:.6g}"


@dataclass
class RunState:
    """What a run carries from epoch to epoch, and what last.pt stores to resume it."""
    history: list
    best_accuracy: float = -1.0
    epoch: int = 0


def _record_the_momentum_that_ran(state):
    """A last.pt written before --momentum set the one-cycle schedule records --momentum 0.9,
    while its schedule ran 0.95 -> 0.85 (saved in its optimizer): compare what ran, so such a
    run resumes with the same flags."""
    with contextlib.suppress(AttributeError, IndexError, KeyError, TypeError):  # not a last.pt: check_resumable says
        ran = state["optimizer"]["param_groups"][0]["max_momentum"]
        if state["identity"]["momentum"] != ran:
            state["identity"]["momentum"] = ran


def _difference(key, saved, value, flag, recorded):
    """How a setting of last.pt differs from this run's, as the user would type it."""
    if key == "data":
        return "other data"
    if not recorded:
        return f"it records no {flag}: written by an older version of this suite"
    shown = [(flag if v else f"--no-{flag[2:]}") if isinstance(v, bool) else f"{flag} {as_typed(v)}"
             for v in (saved, value)]  # as typed: '--widths 16 32 128', '--no-tta'
    return f"{shown[0]}, not {shown[1]}"


def check_resumable(state, path, identity, flags=None):
    """CheckpointError unless last.pt `state` was written by a run with this `identity`
    (the whole recipe, the member's seed and the data's fingerprint); `flags` names each setting's
    flag. The refusal names every setting that differs."""
    if "optimizer" not in state or "identity" not in state:
        raise CheckpointError(f"{path}: not the last.pt of a run of this suite; --resume continues the "
                              f"last.pt that an interrupted run left")
    saved = state["identity"]
    differences = [_difference(key, saved.get(key), value, (flags or {}).get(key, f"--{key.replace('_', '-')}"),
                               key in saved)
                   for key, value in identity.items() if saved.get(key) != value]
    if differences:
        raise CheckpointError(f"{path}: was trained on another recipe or data ({'; '.join(differences)}); resume "
                              f"with the same data and flags as the interrupted run, or start without --resume")


# ----------------------------------------------------------------------------- the loop

def _progress(iterable, enabled, **kwargs):
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, dynamic_ncols=True, **{"leave": False, **kwargs})


def _log_over_bars(log, message, progress):
    """`log` a line without tearing the progress bars on the terminal."""
    if not progress:
        return log(message)
    from tqdm import tqdm
    with tqdm.external_write_mode():
        log(message)


class Trainer:
    """One model's training run: optimizer, schedule, EMA, checkpoints, history.

    Writes `last.pt` after every epoch (resumable) and `best.pt`, the model submitted: every
    epoch, so it ends as the last one, or with --best-epoch only on a new best validation
    accuracy (main.py refuses --best-epoch under --folds, whose validation rows are scored
    out of fold).
    """

    def __init__(self, model, train_set, val_set, recipe, device, checkpoint_dir, seed=0, max_steps_per_epoch=0,
                 log=print, progress=False):
        self.config, self.device, self.log, self.progress = recipe.train, device, log, progress
        self.rank, world_size = rank_and_world_size()
        self.model = model.to(device).to(memory_format=torch.channels_last)
        self.batches = BatchSource(train_set.to(device), self.config.batch_size, recipe.augment, seed, device,
                                   max_steps_per_epoch)
        val_set = val_set.to(device)
        self.has_validation = len(val_set) > 0
        self.keep_best = self.config.best_epoch and self.has_validation  # else the last epoch
        self.val_shard = val_set.subset(slice(self.rank * len(val_set) // world_size,
                                              (self.rank + 1) * len(val_set) // world_size))
        self.max_val_batches = 1 if max_steps_per_epoch else 0
        self.optimizer = torch.optim.SGD(model.parameters(), lr=self.config.lr, momentum=self.config.momentum,
                                         nesterov=True, weight_decay=self.config.weight_decay)
        total_steps = self.config.epochs * self.batches.steps
        # OneCycleLR divides by zero when the warmup is exactly one step (e.g. 5 steps at 0.2): nudge it.
        warmup = self.config.warmup * (1.001 if self.config.warmup * total_steps == 1 else 1)
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=self.config.lr, total_steps=total_steps,
            pct_start=warmup, div_factor=10, final_div_factor=100,
            max_momentum=self.config.momentum, base_momentum=self.config.momentum - MOMENTUM_DIP)
        self.ema = EMA(model, self.config.ema) if self.config.ema else None
        self.paths = {name: os.path.join(checkpoint_dir, name) for name in ("last.pt", "best.pt", "history.csv")}
        self.identity = {**flatten_settings(recipe), "seed": seed, "data": data_fingerprint(train_set, val_set)}
        self.flags = {field.name: flag_name(field) for _, field in setting_fields(recipe)}
        # Per-rank BatchNorm, not SyncBatchNorm: each rank normalises over its own batch, as is
        # standard for DDP. `model` stays unwrapped for evaluation, EMA and checkpoints.
        self.net = (DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
                    if world_size > 1 else model)
        self.state = RunState(history=[])
        self.precision = training_precision(device)  # 'mixed' once resumed in another precision

    @property
    def eval_model(self):
        return self.ema.model if self.ema is not None else self.model

    def restore(self):
        """Continue from last.pt, after checking it belongs to this very run."""
        path = self.paths["last.pt"]
        saved = load_checkpoint(path, map_location=self.device)
        _record_the_momentum_that_ran(saved)
        check_resumable(saved, path, self.identity, self.flags)
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if self.ema is not None:
            self.ema.model.load_state_dict(saved["ema"])
        self.state = RunState(saved["history"], saved["best_accuracy"], saved["epoch"])
        if self.state.epoch and not os.path.exists(self.paths["best.pt"]):  # every finished epoch wrote or kept one
            raise CheckpointError(f"{self.paths['best.pt']}: missing, though {path} has {self.state.epoch} epochs "
                                  f"done; put it back, or train again without --resume")
        if self.rank == 0:  # last.pt holds its rows: put back a history.csv deleted, or cut short by the interrupt
            write_history(self.paths["history.csv"], self.state.history)
        before = saved.get("training_precision", self.precision)  # absent from an older version's last.pt
        note = ""
        if before != self.precision and 0 < self.state.epoch < self.config.epochs:
            so_far = "both bf16 and float32" if before == "mixed" else before
            note = (f"; its epochs so far trained in {so_far}, the rest train in {self.precision} on this "
                    f"machine, so the run mixes the two precisions")
            self.precision = "mixed"
        self.log(f"resumed from {path} after epoch {self.state.epoch}/{self.config.epochs}{note}")

    def save_last(self):
        if self.rank == 0:
            save_checkpoint(self.paths["last.pt"], self.model, optimizer=self.optimizer.state_dict(),
                            scheduler=self.scheduler.state_dict(), ema=self.ema.model.state_dict() if self.ema else None,
                            epoch=self.state.epoch, history=self.state.history,
                            best_accuracy=self.state.best_accuracy, identity=self.identity,
                            training_precision=self.precision)

    def save_epoch(self, row):
        """best.pt on a new best (or every epoch, without keep_best), then last.pt and history.csv."""
        improved = not self.keep_best or row["val_accuracy"] >= self.state.best_accuracy
        if improved and self.has_validation:
            self.state.best_accuracy = row["val_accuracy"]
        if improved and self.rank == 0:
            save_checkpoint(self.paths["best.pt"], self.eval_model, epoch=row["epoch"],
                            val_accuracy=row["val_accuracy"], identity=self.identity)
        self.save_last()
        if self.rank == 0:
            write_history(self.paths["history.csv"], self.state.history)
        return improved

    def train_epoch(self, epoch):
        """One pass over this rank's shard; returns (mean train loss, train accuracy) over all ranks
        and the learning rate of its last step."""
        self.net.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        # unit_scale makes tqdm count and rate images (img/s), not batches.
        bar = _progress(range(self.batches.steps), self.progress, desc=f"epoch {epoch + 1}/{self.config.epochs}",
                        unit="img", unit_scale=self.config.batch_size)
        for step, (images, labels) in zip(bar, self.batches.epoch(epoch)):
            loss, batch_correct = train_step(self.net, self.optimizer, images, labels, self.config.label_smoothing,
                                             self.device)
            lr = self.optimizer.param_groups[0]["lr"]  # the rate this step ran at; the scheduler moves it on
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.model)
            loss_sum += loss
            correct += batch_correct
            if self.progress and step % 20 == 0:  # .item() waits for the device: not every step
                bar.set_postfix({"loss": f"{loss_sum.item() / (step + 1):.3f}",
                                 "acc": f"{correct.item() / ((step + 1) * len(labels)):.3f}"})  # this rank's
        # Checked once an epoch, not per step (a per-step check syncs the GPU every step).
        totals = [loss_sum.item(), correct.item()]
        if dist.is_available() and dist.is_initialized():  # the same numbers everywhere: all stop on NaN
            totals = _sum_over_ranks(totals, self.device).tolist()
        world_steps = self.batches.steps * rank_and_world_size()[1]
        return totals[0] / world_steps, totals[1] / (self.batches.steps * self.config.batch_size), lr

    def run_epoch(self, epoch, epochs_bar):
        started = time.perf_counter()
        train_loss, train_accuracy, lr = self.train_epoch(epoch)
        tensors = [*self.model.parameters(), *self.model.buffers(), *self.eval_model.parameters()]  # BatchNorm's too
        weights_finite = all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())
        if dist.is_available() and dist.is_initialized():  # BatchNorm statistics are per rank: all stop, or none
            weights_finite = _sum_over_ranks([not weights_finite], self.device).item() == 0
        if not (math.isfinite(train_loss) and weights_finite):  # the diverged epoch is never saved
            kept = f"; {self.paths['best.pt']} keeps the best weights up to epoch {epoch}" if epoch else ""
            what = (f"loss became {train_loss}" if not math.isfinite(train_loss)
                    else "weights or BatchNorm statistics became NaN or Inf")
            raise TrainingDiverged(f"{what} in epoch {epoch + 1}; lower --lr "
                                   f"(now {self.config.lr}) and start again{kept}")
        val = validate(self.eval_model, self.val_shard, self.device, self.max_val_batches)
        seconds = time.perf_counter() - started
        row = {"epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": train_accuracy,
               "val_loss": val["loss"], "val_accuracy": val["accuracy"],
               "lr": lr, "seconds": seconds}
        self.state.history.append(row)
        self.state.epoch = epoch + 1
        improved = self.save_epoch(row)
        images_per_second = self.batches.steps * self.config.batch_size / seconds
        if self.progress:
            epochs_bar.set_postfix({"loss": f"{train_loss:.3f}", "acc": f"{train_accuracy:.3f}",
                                    "val_acc": f"{val['accuracy']:.4f}", "img/s": f"{images_per_second:,.0f}"})
        new_best = " * best" if improved and self.keep_best else ""  # only under --best-epoch
        scores = (f"val loss {val['loss']:.4f} acc {val['accuracy']:.4f}{new_best}" if len(self.val_shard)
                  else "no validation images")  # --full-train
        _log_over_bars(self.log, f"epoch {epoch + 1:3d}/{self.config.epochs}  train loss {train_loss:.4f} "
                       f"acc {train_accuracy:.4f}  {scores}  {seconds:.1f}s  {images_per_second:,.0f} img/s",
                       self.progress)

    def fit(self, resume=False):
        """Train to the last epoch (from last.pt when `resume`); returns the history rows."""
        if resume:
            self.restore()
        else:
            self.save_last()  # so an interrupt during the first epoch still leaves something to resume
        epochs_bar = _progress(range(self.state.epoch, self.config.epochs), self.progress, desc="training",
                               unit="epoch", initial=self.state.epoch, total=self.config.epochs, leave=True)
        for epoch in epochs_bar:
            self.run_epoch(epoch, epochs_bar)
        return self.state.history


def train(model, train_set: DigitDataset, val_set: DigitDataset, recipe, device, checkpoint_dir, seed=0,
          resume=False, max_steps_per_epoch=0, log=print, progress=None):
    """Train `model` with `recipe` (its .train and .augment settings); returns the history,
    a list of per-epoch dicts (HISTORY_COLUMNS).

    In a process group, the batch size is the global batch (main.py checks that it divides
    by the world size) and only rank 0 writes. `progress`: tqdm bars for epochs and
    batches; None = only when stderr is a terminal. `log` gets one line per epoch.
    """
    progress = (sys.stderr.isatty() if progress is None else progress) and rank_and_world_size()[0] == 0
    trainer = Trainer(model, train_set, val_set, recipe, device, checkpoint_dir, seed, max_steps_per_epoch, log,
                      progress)
    return trainer.fit(resume)
