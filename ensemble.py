"""The members of a run: which rows and which architecture each one trains on, and what
their predictions are worth.

- One model: trains on 90% of train.csv, validated on the other 10% (or on all rows,
  with --full-train).
- --ensemble N: N members with seeds seed..seed+N-1 on the same split.
- --folds K: K members; member k holds out fold k of a stratified K-fold split and
  trains on the rest, so every row of train.csv is predicted once by a model that never
  saw it: the out-of-fold accuracy is an honest estimate, and the members together have
  seen every row. Fold members keep their last epoch (no epoch is picked on the rows
  the estimate is made on).
- --mix ARCH: every other member uses architecture ARCH with its own default widths and
  dropout, for a more diverse ensemble, trained for --mix-epochs epochs (0: --epochs).
- --pseudo-label P: after the first round, test images the ensemble predicts with
  probability >= P join every member's training rows, with those labels, for a second
  round (written under <checkpoint-dir>/round2).
"""

import os
import re
from dataclasses import dataclass, replace

import torch

from DigitRecognizerModel import NUM_CLASSES, own_defaults
from dataloader import DigitDataset, stratified_split
from recipe import VAL_FRACTION, Recipe


@dataclass
class Member:
    index: int
    seed: int
    recipe: Recipe  # what this member trains with: the run's, or under --mix its architecture and epochs
    folder: str
    train_rows: torch.Tensor  # indices into train.csv
    val_rows: torch.Tensor


def kfold_split(labels, folds, seed):
    """`folds` disjoint index tensors covering every row, each with ~1/folds of every digit."""
    generator = torch.Generator().manual_seed(seed)
    parts = [[] for _ in range(folds)]
    for digit in labels.unique().tolist():
        members = torch.nonzero(labels == digit).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        for fold in range(folds):
            parts[fold].append(members[fold::folds])
    return [torch.cat(part).sort().values for part in parts]


def member_recipe(recipe, index):
    """The run's recipe, or for every other member under --mix, the mixed architecture with
    that architecture's own default widths and dropout, trained for --mix-epochs epochs."""
    if recipe.ensemble.mix == "none" or index % 2 == 0:
        return recipe
    model = replace(recipe.model, arch=recipe.ensemble.mix, **own_defaults(recipe.ensemble.mix))
    train = replace(recipe.train, epochs=recipe.ensemble.mix_epochs or recipe.train.epochs)
    return replace(recipe, model=model, train=train)


def member_count(recipe):
    return recipe.ensemble.folds or recipe.ensemble.ensemble


def member_folders(recipe, checkpoint_dir):
    """Checkpoint folder of each member: the folder itself for a single model."""
    count = member_count(recipe)
    return [checkpoint_dir] if count == 1 else [os.path.join(checkpoint_dir, f"member{m + 1}") for m in range(count)]


def existing_member_folders(checkpoint_dir):
    """{K: path} of every memberK entry in `checkpoint_dir` (this run's or an earlier one's), by K."""
    if not os.path.isdir(checkpoint_dir):
        return {}
    numbers = sorted(int(name[len("member"):]) for name in os.listdir(checkpoint_dir)
                     if re.fullmatch(r"member\d+", name))
    return {n: os.path.join(checkpoint_dir, f"member{n}") for n in numbers}


def stale_member_folders(recipe, checkpoint_dir):
    """The memberK/ folders in `checkpoint_dir` beyond this run's members: an earlier run's,
    which `inference.py --checkpoint <dir>/member*/best.pt` would mix into this run's."""
    count = member_count(recipe)
    if count == 1:
        return []
    folders = [path for n, path in existing_member_folders(checkpoint_dir).items() if n > count]
    # only folders holding checkpoints: a file or another folder of that name mixes nothing
    return [f for f in folders if any(os.path.isfile(os.path.join(f, name)) for name in ("best.pt", "last.pt"))]


def plan(recipe, labels, checkpoint_dir, seed):
    """The members of a run on train.csv `labels` (N,), in training order."""
    if recipe.ensemble.folds:
        held_out = kfold_split(labels, recipe.ensemble.folds, seed)
        everything = torch.arange(len(labels))
        splits = [(everything[~torch.isin(everything, fold)], fold) for fold in held_out]
    else:
        split = stratified_split(labels, 0 if recipe.ensemble.full_train else VAL_FRACTION, seed)
        splits = [split] * recipe.ensemble.ensemble
    folders = member_folders(recipe, checkpoint_dir)
    return [Member(index, seed + index, member_recipe(recipe, index), folders[index], train_rows, val_rows)
            for index, (train_rows, val_rows) in enumerate(splits)]


def out_of_fold_probs(members, models, full: DigitDataset, predict):
    """(N, classes) probabilities of every row by the one member that held it out;
    `predict(models, images)` gives class probabilities."""
    probs = torch.zeros(len(full), NUM_CLASSES)
    for member, model in zip(members, models):
        probs[member.val_rows] = predict([model], full.images[member.val_rows])
    return probs


def pseudo_labelled(test_images, test_probs, threshold):
    """The test images predicted with probability >= threshold, labelled with the prediction."""
    confidence, predicted = test_probs.max(1)
    keep = confidence >= threshold
    # rows -1: not from train.csv (no line to name in a report)
    return DigitDataset(test_images[keep], predicted[keep], torch.full((int(keep.sum()),), -1))


def with_extra(dataset: DigitDataset, extra: DigitDataset):
    """`dataset` followed by `extra` (e.g. pseudo-labelled test images)."""
    if extra is None or not len(extra):
        return dataset
    return DigitDataset(torch.cat([dataset.images, extra.images]), torch.cat([dataset.labels, extra.labels]),
                        torch.cat([dataset.rows, extra.rows]))
