"""The toy ablation's variants (each is the toy recipe with a few dotted overrides) and its sets of
variants (each set is one report)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    label: str
    overrides: tuple[str, ...]


_NO_IDA = "method.ida.enabled=false"
_NO_ISG = "method.isg.weight=0"
_NO_GAN = "method.gan.type=none"

#: name -> recipe overrides on configs/toy/distill.yaml (the recipe itself is the full method).
VARIANTS: dict[str, Variant] = {
    "vanilla": Variant("vanilla DMD2", (_NO_IDA, _NO_ISG, _NO_GAN)),
    "ida": Variant("+IDA", (_NO_ISG, _NO_GAN)),
    "isg": Variant("+ISG", (_NO_IDA, _NO_GAN)),
    "ida_isg": Variant("+IDA+ISG", (_NO_GAN,)),
    "full": Variant("full (IDA+ISG+GAN)", ()),
    # TTUR 1: one fake-score update per generator update, so the fake score lags the generator.
    "stressed": Variant(
        "vanilla DMD2, TTUR 1 (stressed)", (_NO_IDA, _NO_ISG, _NO_GAN, "method.ttur_ratio=1")
    ),
    "stressed_ida": Variant("+IDA, TTUR 1 (stressed)", (_NO_ISG, _NO_GAN, "method.ttur_ratio=1")),
    # ISG's loss and weight (on request): the paper's squared L2 instead of the code's Charbonnier,
    # and SDXL's weight 0.2 instead of SD3.5's 1.0.
    "isg_l2": Variant("+ISG, L2 loss", (_NO_IDA, _NO_GAN, "method.isg.loss=l2")),
    "isg_w02": Variant("+ISG, weight 0.2", (_NO_IDA, _NO_GAN, "method.isg.weight=0.2")),
    # The official code's quirk: the generator's adversarial gradient stays in D's heads' .grad and
    # is added to D's next update (the recipe, like the schema's default, leaves it off).
    "full_leak": Variant("full, official grad leak", ("method.gan.official_grad_leak=true",)),
}
#: The ablation set's variants (stressed_ida, isg_l2 and isg_w02 run on request; full_leak: SETS).
DEFAULT_VARIANTS = ("vanilla", "ida", "isg", "ida_isg", "full", "stressed")
BASELINE = "vanilla"
SAMPLER = "renoise"  # the students' sampler in the ablation


@dataclass(frozen=True)
class VariantSet:
    """One report: its title, the variants it runs by default, the variant whose seconds per
    iteration the others are divided by, and the stem of its files in ``--out``."""

    title: str
    variants: tuple[str, ...]
    baseline: str
    stem: str


#: ``--set`` name -> variant set.
SETS: dict[str, VariantSet] = {
    "ablation": VariantSet(
        "vanilla DMD2, IDA, ISG and the full SenseFlow recipe", DEFAULT_VARIANTS, BASELINE, "toy_ablation"
    ),
    "grad_leak": VariantSet(
        "the official code's leak of the generator's adversarial gradient into D's update",
        ("full", "full_leak"),
        "full",
        "toy_grad_leak",
    ),
}
DEFAULT_SET = "ablation"
