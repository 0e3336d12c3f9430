"""Named training recipes (``--recipe``): the option defaults of a published SKNet training, each with the
accuracy it was published at and what its source leaves unsaid.

A recipe only changes defaults: any option given on the command line overrides it. Learning rates are
for the global batch named in the description; scale them with ``--lr`` for another.
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Preset", "PRESETS"]


@dataclass(frozen=True)
class Preset:
    """A recipe: ``options`` (argparse destinations and values), and ``description``, for ``--help``: the model
    it trained, the accuracy published, and the details its source does not give."""

    description: str
    options: dict = field(default_factory=dict)


PRESETS = {
    "paper": Preset(
        description=(
            "the SKNet paper's ImageNet training of SKNet-50 (--model sknet50; Li et al., CVPR 2019: 20.79 %% "
            "top-1 error, single 224x224 crop): SGD with momentum 0.9, weight decay 1e-4 and a global batch of "
            "256, random crops and flips (SENet's augmentation, which the authors' code follows), label "
            "smoothing. Not confirmed from the paper's text: its learning-rate schedule, here the standard "
            "ResNet one (lr 0.1, divided by 10 every 30 epochs, 100 epochs), and the smoothing's epsilon, here "
            "0.1, that of the label-smoothing paper it cites"
        ),
        options=dict(
            opt="sgd", lr=0.1, weight_decay=1e-4, sched="step", decay_epochs=30.0, decay_rate=0.1, epochs=100,
            warmup_epochs=0.0, label_smoothing=0.1,
        ),
    ),
    "timm-ra": Preset(
        description=(
            "timm's 'RA' recipe, of its skresnext50_32x4d.ra_in1k weights (--model skresnext50_32x4d: 80.17 %% "
            "top-1 at 224x224 in timm's results): SGD with RandAugment. timm publishes no hyper-parameters for "
            "these weights; the rest comes from timm's documented training examples (RandAugment "
            "rand-m9-mstd0.5-inc1 and per-pixel random erasing from its EfficientNet ones; timm's SGD with "
            "Nesterov momentum, cosine decay after 5 warm-up epochs and lr 0.1 per 256 images from its ResNet "
            "one), and 100 epochs, an erasing probability of 0.2 and an EMA of decay 0.9998 are choices, not "
            "published values: a starting point, not the published run"
        ),
        options=dict(
            opt="nesterov", sched="cosine", epochs=100, warmup_epochs=5.0, weight_decay=1e-4,
            aa="rand-m9-mstd0.5-inc1", reprob=0.2, remode="pixel", model_ema=True, model_ema_decay=0.9998,
        ),
    ),
}
