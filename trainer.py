"""The train/eval loop: SGD with a one-cycle LR schedule, label smoothing, checkpoints, resume.

The whole training set lives on the device as one uint8 tensor; each epoch is a
`randperm` cut into batch slices, augmented as a batch on the device. Every epoch's
shuffle, augmentation and dropout are seeded from (seed, epoch), so a run resumed from
`last.pt` repeats exactly what the uninterrupted run would have done.
"""

import copy
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

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


def eval_batch_size(device):
    # Measured on 2 CPU cores: batch 256 in channels_last keeps activations in cache and
    # predicts 2-4x faster than batch 1024+; a GPU wants big batches.
    return 4096 if device.type == "cuda" else 256


def autocast(device):
    # bf16 on CUDA only: on CPU without bf16 units it is slower than float32.
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
    """{'loss', 'accuracy', 'predictions'} of `model` on a labelled dataset."""
    images, labels = dataset.images, dataset.labels
    if max_batches:
        images, labels = images[:max_batches * eval_batch_size(device)], labels[:max_batches * eval_batch_size(device)]
    if len(images) == 0:
        return {"loss": float("nan"), "accuracy": float("nan"), "predictions": labels}
    logits = predict_logits(model, images, device)
    labels = labels.to(logits.device)
    predictions = logits.argmax(1)
    return {
        "loss": F.cross_entropy(logits, labels).item(),
        "accuracy": (predictions == labels).float().mean().item(),
        "predictions": predictions.cpu(),
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
    return tqdm(iterable, leave=False, dynamic_ncols=True, **kwargs)


def train(model, train_set: DigitDataset, val_set: DigitDataset, config: TrainConfig, device,
          checkpoint_dir, resume=False, log=print, progress=None):
    """Train `model`; returns the history, a list of per-epoch dicts (HISTORY_COLUMNS).

    Writes `last.pt` after every epoch (resumable) and `best.pt` whenever validation
    accuracy reaches a new best (every epoch when there is no validation set).
    """
    progress = sys.stderr.isatty() if progress is None else progress
    model.to(device).to(memory_format=torch.channels_last)
    train_set, val_set = train_set.to(device), val_set.to(device)
    steps_per_epoch = max(1, len(train_set) // config.batch_size)  # last partial batch dropped
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
        save_checkpoint(last_path, model, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                        ema=ema.model.state_dict() if ema else None, epoch=epoch, history=history,
                        best_accuracy=best_accuracy, train_config=asdict(config))

    if start_epoch == 0:
        save_last(0)  # so an interrupt during the first epoch still leaves something to resume

    for epoch in range(start_epoch, config.epochs):
        started = time.perf_counter()
        model.train()
        torch.manual_seed(config.seed * 1000 + epoch)  # dropout
        generator = torch.Generator(device=device).manual_seed(config.seed * 1000 + epoch)
        order = torch.randperm(len(train_set), generator=generator, device=device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        steps = _progress(range(steps_per_epoch), progress, desc=f"epoch {epoch + 1}/{config.epochs}")
        for step in steps:
            batch = order[step * config.batch_size:(step + 1) * config.batch_size]
            x = train_set.images[batch].float().div_(255)  # (B, 1, 28, 28) in [0, 1]
            x = augment(x, config.augment, generator).contiguous(memory_format=torch.channels_last)
            y = train_set.labels[batch]
            with autocast(device):
                logits = model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update(model)
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
            if progress and step % 20 == 0:
                steps.set_postfix(loss=f"{loss.item():.3f}")
        # Checked once an epoch, not per step (a per-step check syncs the GPU every step); the
        # diverged epoch is never saved, so best.pt and last.pt keep the last good weights.
        train_loss = loss_sum.item() / steps_per_epoch
        if not math.isfinite(train_loss):
            kept = f"; {best_path} keeps the best weights up to epoch {epoch}" if epoch else ""
            raise TrainingDiverged(
                f"loss became {train_loss} in epoch {epoch + 1}; lower --lr (now {config.lr}) and start again{kept}")
        eval_model = ema.model if ema is not None else model
        val = evaluate(eval_model, val_set, device, max_batches=1 if config.max_steps_per_epoch else 0)
        seconds = time.perf_counter() - started
        row = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_accuracy": correct.item() / (steps_per_epoch * config.batch_size),
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": seconds,
        }
        history.append(row)
        improved = len(val_set) == 0 or val["accuracy"] >= best_accuracy
        if improved:
            best_accuracy = val["accuracy"] if len(val_set) else best_accuracy
            save_checkpoint(best_path, eval_model, epoch=epoch + 1, val_accuracy=val["accuracy"],
                            train_config=asdict(config))
        save_last(epoch + 1)
        write_history(os.path.join(checkpoint_dir, "history.csv"), history)
        log(f"epoch {epoch + 1:3d}/{config.epochs}  train loss {train_loss:.4f} acc {row['train_accuracy']:.4f}  "
            f"val loss {val['loss']:.4f} acc {val['accuracy']:.4f}{' *' if improved else ''}  "
            f"{seconds:.1f}s  {steps_per_epoch * config.batch_size / seconds:,.0f} img/s")
    return history
