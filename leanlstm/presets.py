"""Paper set-ups. ``small``, ``medium`` and ``large`` are Zaremba et al. (2014) exactly as published.

Zaremba et al. sum the loss over the unrolled steps and average it over the batch, with lr 1; leanlstm's PTB
task uses the same scaling, so their learning rates and clipping norms carry over unchanged. The lr stays
constant for ``decay_after`` epochs, then is multiplied by ``lr_decay`` every epoch.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .tasks.lm import LMConfig
from .train import TrainConfig


@dataclass(frozen=True)
class Preset:
    lm: LMConfig
    train: TrainConfig
    description: str


def _zaremba(hidden: int, dropout: float, init: float, bptt: int, epochs: int, decay_after: int,
             decay: float, clip: float, description: str) -> Preset:
    return Preset(LMConfig(10000, hidden, [hidden, hidden], dropout, init),
                  TrainConfig(epochs=epochs, batch_size=20, bptt=bptt, lr=1.0, lr_decay=decay,
                              decay_after=decay_after, clip=clip), description)


PRESETS: dict[str, Preset] = {
    "small": _zaremba(200, 0.0, 0.1, 20, 13, 4, 0.5, 5.0, "Zaremba small: 2x200, no dropout, 13 epochs"),
    "medium": _zaremba(650, 0.5, 0.05, 35, 39, 6, 0.8, 5.0, "Zaremba medium: 2x650, dropout 0.5, 39 epochs"),
    "large": _zaremba(1500, 0.65, 0.04, 35, 55, 14, 1 / 1.15, 10.0,
                      "Zaremba large: 2x1500, dropout 0.65, 55 epochs"),
}
# The medium model on a schedule that fits about 100 minutes on a 2-core CPU: a higher lr (20 per token,
# i.e. 20/35 with the summed loss) and clipping 0.25 per token, decayed by 1/1.4 per epoch after epoch 5.
PRESETS["medium-cpu"] = Preset(
    PRESETS["medium"].lm,
    replace(PRESETS["medium"].train, epochs=14, lr=20 / 35, clip=0.25 * 35, decay_after=5, lr_decay=1 / 1.4),
    "Zaremba medium architecture on a 14-epoch schedule (about 100 min on 2 CPU cores)")
# A seconds-long run for smoke tests and CI: small model, a few hundred windows per epoch.
PRESETS["tiny"] = Preset(LMConfig(10000, 32, [32, 32], 0.0, 0.1),
                         TrainConfig(epochs=2, batch_size=20, bptt=20, lr=1.0, lr_decay=0.5, decay_after=1,
                                     clip=5.0, max_batches=50),
                         "smoke run: 2x32, 2 epochs of 50 windows")


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
