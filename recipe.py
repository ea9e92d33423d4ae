"""The recipe: every setting of a run, in one dataclass tree, and the presets.

Each field is declared once, with its default, range and help (`cli.setting`); main.py
turns every field into a flag, presets are small differences from the defaults, and every
checkpoint stores the whole recipe, so `--resume` can tell a changed setting.
"""

from dataclasses import dataclass

from DigitRecognizerModel import ARCHITECTURES, ModelConfig, own_defaults
from cli import as_typed, replace_settings, setting
from dataloader import AugmentConfig
from trainer import MAX_EPOCHS, TrainConfig


VAL_FRACTION = 0.1  # stratified hold-out of train.csv: reports accuracy (and picks best.pt under --best-epoch)


@dataclass(frozen=True)
class EnsembleConfig:
    ensemble: int = setting(1, "train N members with seeds seed..seed+N-1 and average their softmax", low=1, high=100)
    folds: int = setting(0, "k-fold: K members, each holding out one fold, so every train.csv row is predicted "
                            "out of fold; 0 = off", low=0, high=20)
    mix: str = setting("none", "a second architecture for every other member", choices=lambda: ["none", *ARCHITECTURES])
    mix_epochs: int = setting(0, "epochs of the --mix members; 0 = --epochs", low=0, high=MAX_EPOCHS)
    tta: bool = setting(True, "test-time augmentation: average over shifted/rotated views")
    full_train: bool = setting(False, "train on all rows with no validation split; the model after the last "
                                      "epoch is the one submitted")
    pseudo_label: float = setting(0.0, "a second round adds the test images the first round predicts with at least "
                                       "this probability, with those labels (label smoothing keeps a sure "
                                       "prediction near 0.91: try 0.85); 0 = off", low=0, high=1)


@dataclass(frozen=True)
class Recipe:
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    augment: AugmentConfig = AugmentConfig()
    ensemble: EnsembleConfig = EnsembleConfig()


# Each preset is the default recipe with these settings changed. Chosen on outer hold-outs of
# train.csv (final-epoch models, never a best epoch); the figures are in the README.
PRESETS = {
    "fast": {"epochs": 3, "tta": False},
    "default": {},
    "best": {"folds": 5, "mix": "deotte", "mix_epochs": 15},
}


def preset(name) -> Recipe:
    return replace_settings(Recipe(), PRESETS[name])


def flag_notes():
    """{setting name: '--preset fast: 3'; 'widths': '--arch deotte: 32 64 128'}: what each preset, and each
    architecture's own widths and dropout (--arch, --mix), change, for --help."""
    notes = {}

    def add(key, text):
        notes[key] = f"{notes[key]}; {text}" if key in notes else text
    for name, changes in PRESETS.items():
        for key, value in changes.items():
            add(key, f"--preset {name}: {as_typed(value)}")
    default_model = ModelConfig()
    for arch in sorted(ARCHITECTURES):
        for key, value in own_defaults(arch).items():
            if value != getattr(default_model, key):
                add(key, f"--arch {arch}: {as_typed(value)}")
    return notes
