"""The train/eval loop: SGD with a one-cycle LR schedule, label smoothing, checkpoints, resume.

The whole training set lives on the device as one uint8 tensor; each epoch is a
`randperm` cut into batch slices, augmented as a batch on the device. Every epoch's
shuffle, augmentation and dropout are seeded from (seed, epoch), so a run resumed from
`last.pt` repeats exactly what the uninterrupted run would have done.

Under torchrun (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel: every
rank draws the same per-epoch permutation and trains on its own equal slice of it, with
its own augmentation and dropout; `batch_size` stays the global batch. Validation is
sharded too and its sums all-reduced; only rank 0 writes files.
"""

import copy
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from DigitRecognizerModel import CheckpointError, load_checkpoint, save_checkpoint
from dataloader import AugmentConfig, DigitDataset, atomic_write_text, augment

HISTORY_COLUMNS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds"]


class TrainingDiverged(Exception):
    """The loss became NaN or Inf."""


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1  # peak of the one-cycle schedule
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    warmup_fraction: float = 0.2  # share of steps spent rising to the peak LR
    ema_decay: float = 0.0  # 0 = off; else evaluate and save an exponential moving average
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    max_steps_per_epoch: int = 0  # 0 = all; --dry-run sets 1


def choose_device(name="auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(name)


def init_distributed(device):
    """Join torchrun's process group when WORLD_SIZE > 1; returns this process's device.

    Plain `python main.py` (no WORLD_SIZE) gets no process group and the device unchanged.
    """
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return device
    # torch obeys OMP_NUM_THREADS, which torchrun sets to 1 when it starts several processes
    # per node (unless the user set it); without it, the node's cores are shared out.
    if "OMP_NUM_THREADS" not in os.environ:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, torch.get_num_threads() // local_processes))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return device


def close_distributed(wait_for_peers=False):
    if dist.is_available() and dist.is_initialized():
        if wait_for_peers:
            # After a good run, let rank 0 finish writing first: a rank that tears gloo down
            # while its peer is busy can abort ("terminate called without an active exception").
            dist.barrier()
        dist.destroy_process_group()


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


def _merge_validation(val, device):
    """Loss and accuracy over every rank's disjoint validation shard (each sample once)."""
    count = len(val["predictions"])
    total = _sum_over_ranks([val["loss"] * count, val["accuracy"] * count, count] if count else [0.0] * 3, device)
    loss, accuracy = (total[:2] / total[2]).tolist()  # NaN when the validation set is empty
    return {"loss": loss, "accuracy": accuracy}


def eval_batch_size(device):
    # Measured on 2 CPU cores: batch 256 in channels_last keeps activations in cache and
    # predicts 2-4x faster than batch 1024+; a GPU wants big batches.
    return 4096 if device.type == "cuda" else 256


def autocast(device):
    # bf16 on CUDA only; the CPU path stays float32 (AVX2-only CPUs have no bf16 units).
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.inference_mode()
def predict_logits(model, images, device, batch_size=None, transform=None):
    """Logits (N, classes) in float32 for uint8 images (N, 1, 28, 28), in eval mode."""
    model.eval()
    batch_size = batch_size or eval_batch_size(device)
    outputs = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device, non_blocking=True).float().div_(255)
        if transform is not None:
            x = transform(x)
        with autocast(device):
            logits = model(x.contiguous(memory_format=torch.channels_last))
        outputs.append(logits.float())
    return torch.cat(outputs) if outputs else torch.zeros(0, 10, device=device)


def evaluate(model, dataset: DigitDataset, device, max_batches=0):
    """{'loss', 'accuracy', 'predictions' (N,), 'probabilities' (N, classes)} on a labelled dataset.

    Loss and accuracy are NaN for an empty dataset; predictions and probabilities are on the CPU.
    """
    images, labels = dataset.images, dataset.labels
    if max_batches:
        limit = max_batches * eval_batch_size(device)
        images, labels = images[:limit], labels[:limit]
    logits = predict_logits(model, images, device)
    labels = labels.to(logits.device)
    predictions = logits.argmax(1)
    return {
        "loss": F.cross_entropy(logits, labels).item(),
        "accuracy": (predictions == labels).float().mean().item(),
        "predictions": predictions.cpu(),
        "probabilities": logits.softmax(1).cpu(),
    }


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


def train_step(net, optimizer, dataset: DigitDataset, batch, config: TrainConfig, generator, device):
    """One SGD step on the images at indices `batch`: augment, forward, backward, update.

    Returns (loss, number correct) as device tensors, so the loop never waits on them.
    """
    x = dataset.images[batch].float().div_(255)  # (B, 1, 28, 28) uint8 -> float in [0, 1]
    x = augment(x, config.augment, generator).contiguous(memory_format=torch.channels_last)
    y = dataset.labels[batch]
    with autocast(device):
        logits = net(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.argmax(1) == y).sum()


def write_history(path, history):
    lines = [",".join(HISTORY_COLUMNS)]
    for row in history:
        lines.append(",".join(_fmt(row[c]) for c in HISTORY_COLUMNS))
    atomic_write_text(path, "\n".join(lines) + "\n")


def _fmt(value):
    return str(value) if isinstance(value, int) else f"{value:.6g}"


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


def train(model, train_set: DigitDataset, val_set: DigitDataset, config: TrainConfig, device,
          checkpoint_dir, resume=False, log=print, progress=None):
    """Train `model`; returns the history, a list of per-epoch dicts (HISTORY_COLUMNS).

    Writes `last.pt` after every epoch (resumable) and `best.pt` whenever validation
    accuracy reaches a new best (every epoch when there is no validation set).
    In a process group, `config.batch_size` is the global batch (main.py checks that
    it divides by the world size) and only rank 0 writes.
    `progress`: draw tqdm bars for epochs and batches; None = only when stderr is a terminal.
    `log` gets one line per epoch; pass a no-op (and progress=False) for a silent run.
    """
    rank, world_size = rank_and_world_size()
    progress = (sys.stderr.isatty() if progress is None else progress) and rank == 0
    model.to(device).to(memory_format=torch.channels_last)
    train_set, val_set = train_set.to(device), val_set.to(device)
    # Equal disjoint shards, so every rank runs the same number of steps; with the global
    # batch split evenly, the step count and LR schedule do not depend on the world size.
    batch_size, shard_size = config.batch_size // world_size, len(train_set) // world_size
    val_shard = val_set.subset(slice(rank * len(val_set) // world_size, (rank + 1) * len(val_set) // world_size))
    steps_per_epoch = max(1, shard_size // batch_size)  # last partial batch dropped
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)

    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                nesterov=True, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch,
        pct_start=config.warmup_fraction, div_factor=10, final_div_factor=100)
    ema = EMA(model, config.ema_decay) if config.ema_decay else None
    last_path = os.path.join(checkpoint_dir, "last.pt")
    best_path = os.path.join(checkpoint_dir, "best.pt")
    history, best_accuracy, start_epoch = [], -1.0, 0

    if resume:
        state = load_checkpoint(last_path, map_location=device)
        if "optimizer" not in state or state["model_config"] != asdict(model.config):
            raise CheckpointError(f"{last_path}: not the last.pt of a run of this model; "
                                  f"--resume continues the last.pt that an interrupted run left")
        saved = state.get("train_config", {})
        for key in ("epochs", "batch_size", "lr", "seed"):
            if saved.get(key) != getattr(config, key):
                raise CheckpointError(
                    f"{last_path}: was trained with {key}={saved.get(key)}, not {getattr(config, key)}; "
                    f"resume with the same flags as the interrupted run")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.model.load_state_dict(state["ema"])
        history, best_accuracy, start_epoch = state["history"], state["best_accuracy"], state["epoch"]
        log(f"resumed from {last_path} after epoch {start_epoch}/{config.epochs}")

    def save_last(epoch):
        if rank == 0:
            save_checkpoint(last_path, model, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                            ema=ema.model.state_dict() if ema else None, epoch=epoch, history=history,
                            best_accuracy=best_accuracy, train_config=asdict(config))

    if start_epoch == 0:
        save_last(0)  # so an interrupt during the first epoch still leaves something to resume
    # Per-rank BatchNorm, not SyncBatchNorm: each rank normalises over its own batch_size
    # images, as is standard for DDP, sparing a collective per BN layer per pass.
    # `model` stays unwrapped for evaluation, EMA and checkpoints (plain state_dict keys).
    net = (DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
           if world_size > 1 else model)

    epochs = _progress(range(start_epoch, config.epochs), progress, desc="training", unit="epoch",
                       initial=start_epoch, total=config.epochs, leave=True)
    for epoch in epochs:
        started = time.perf_counter()
        net.train()
        epoch_seed = config.seed * 1000 + epoch
        rank_seed = epoch_seed + (rank << 32)  # == epoch_seed on rank 0 and in a single process
        torch.manual_seed(rank_seed)  # dropout
        generator = torch.Generator(device=device).manual_seed(epoch_seed)
        order = torch.randperm(len(train_set), generator=generator, device=device)  # the same on every rank
        order = order[rank * shard_size:(rank + 1) * shard_size]
        if rank:
            generator.manual_seed(rank_seed)  # augmentation differs per rank
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        # unit_scale makes tqdm count and rate images (img/s), not batches.
        steps = _progress(range(steps_per_epoch), progress, desc=f"epoch {epoch + 1}/{config.epochs}",
                          unit="img", unit_scale=config.batch_size)
        for step in steps:
            batch = order[step * batch_size:(step + 1) * batch_size]
            loss, batch_correct = train_step(net, optimizer, train_set, batch, config, generator, device)
            scheduler.step()
            if ema is not None:
                ema.update(model)
            loss_sum += loss
            correct += batch_correct
            if progress and step % 20 == 0:  # .item() waits for the device: not every step
                steps.set_postfix({"loss": f"{loss_sum.item() / (step + 1):.3f}",
                                   "acc": f"{correct.item() / ((step + 1) * config.batch_size):.3f}"})
        # Checked once an epoch, not per step (a per-step check syncs the GPU every step); the
        # diverged epoch is never saved, so best.pt and last.pt keep the last good weights.
        loss_sum, correct = loss_sum.item(), correct.item()
        if world_size > 1:  # every rank gets the same numbers, so all stop together on NaN
            loss_sum, correct = _sum_over_ranks([loss_sum, correct], device).tolist()
        train_loss = loss_sum / (steps_per_epoch * world_size)
        if not math.isfinite(train_loss):
            kept = f"; {best_path} keeps the best weights up to epoch {epoch}" if epoch else ""
            raise TrainingDiverged(
                f"loss became {train_loss} in epoch {epoch + 1}; lower --lr (now {config.lr}) and start again{kept}")
        eval_model = ema.model if ema is not None else model
        if world_size > 1:  # the ranks' last BatchNorm updates differ: evaluate rank 0's, which is saved
            for buffer in eval_model.buffers():
                dist.broadcast(buffer, src=0)
        val = evaluate(eval_model, val_shard, device, max_batches=1 if config.max_steps_per_epoch else 0)
        if world_size > 1:
            val = _merge_validation(val, device)
        seconds = time.perf_counter() - started
        images_per_second = steps_per_epoch * config.batch_size / seconds
        row = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_accuracy": correct / (steps_per_epoch * config.batch_size),
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": seconds,
        }
        history.append(row)
        improved = len(val_set) == 0 or val["accuracy"] >= best_accuracy
        if improved:
            best_accuracy = val["accuracy"] if len(val_set) else best_accuracy
            if rank == 0:
                save_checkpoint(best_path, eval_model, epoch=epoch + 1, val_accuracy=val["accuracy"],
                                train_config=asdict(config))
        save_last(epoch + 1)
        if rank == 0:
            write_history(os.path.join(checkpoint_dir, "history.csv"), history)
        if progress:
            epochs.set_postfix({"loss": f"{train_loss:.3f}", "acc": f"{row['train_accuracy']:.3f}",
                                "val_acc": f"{val['accuracy']:.4f}", "img/s": f"{images_per_second:,.0f}"})
        _log_over_bars(log, f"epoch {epoch + 1:3d}/{config.epochs}  train loss {train_loss:.4f} "
                       f"acc {row['train_accuracy']:.4f}  val loss {val['loss']:.4f} acc {val['accuracy']:.4f}"
                       f"{' *' if improved else ''}  {seconds:.1f}s  {images_per_second:,.0f} img/s", progress)
    return history
