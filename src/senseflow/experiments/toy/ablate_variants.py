"""The toy ablation's variants (each is the toy recipe with a few dotted overrides) and its sets of
variants (each set is one report)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """A recipe variant; ``against``: the variant the paired tests compare it with (the one it differs
    from by one change, or vanilla DMD2 for the full recipe)."""

    label: str
    overrides: tuple[str, ...]
    against: str | None = None


_NO_IDA = "method.ida.enabled=false"
_NO_ISG = "method.isg.weight=0"
_NO_GAN = "method.gan.type=none"
_NO_BS = "method.backward_sim_prob=0"
_CHARBONNIER = "method.isg.loss=charbonnier"  # the official SD3.5 code's ISG loss (eps 1e-3)
_TTUR1 = "method.ttur_ratio=1"  # one fake-score update per generator update: the fake score lags
_HIGH_LR = ("optim.generator.lr=5e-4", "optim.fake.lr=5e-4")  # 5x the recipe's: G outruns the fake score
_VANILLA = (_NO_IDA, _NO_ISG, _NO_GAN)  # DMD2 with backward simulation, none of SenseFlow's terms

#: name -> recipe overrides on configs/toy/distill.yaml (the recipe itself is the full method, with
#: the paper's squared-L2 ISG at weight 1).
VARIANTS: dict[str, Variant] = {
    "no_bs": Variant("DMD2, no backward simulation", (*_VANILLA, _NO_BS), "vanilla"),
    "vanilla": Variant("vanilla DMD2", _VANILLA),
    "ida": Variant("+IDA", (_NO_ISG, _NO_GAN), "vanilla"),
    "isg": Variant("+ISG (L2, w 1)", (_NO_IDA, _NO_GAN), "vanilla"),
    "isg_l2_w3": Variant("+ISG (L2, w 3)", (_NO_IDA, _NO_GAN, "method.isg.weight=3"), "isg"),
    "isg_charbonnier": Variant("+ISG (Charbonnier, w 1)", (_NO_IDA, _NO_GAN, _CHARBONNIER), "isg"),
    "isg_charbonnier_w02": Variant(
        "+ISG (Charbonnier, w 0.2)",
        (_NO_IDA, _NO_GAN, _CHARBONNIER, "method.isg.weight=0.2"),
        "isg_charbonnier",
    ),
    # the DMD term's guidance fixed at the low end of the recipe's 2-4 range: does the scale drive the
    # Charbonnier arm's colour cast and texture?
    "isg_charbonnier_cfg2": Variant(
        "+ISG (Charbonnier, w 1), DMD CFG 2",
        (
            _NO_IDA,
            _NO_GAN,
            _CHARBONNIER,
            "method.dmd.teacher_guidance.min=2.0",
            "method.dmd.teacher_guidance.max=2.0",
        ),
        "isg_charbonnier",
    ),
    "ida_isg": Variant("+IDA+ISG", (_NO_GAN,), "isg"),
    "full": Variant("full (IDA+ISG+GAN)", (), "vanilla"),
    "full_charbonnier": Variant("full, Charbonnier ISG", (_CHARBONNIER,), "full"),
    "full_no_gan_charbonnier": Variant(
        "full, Charbonnier ISG, no GAN", (_CHARBONNIER, _NO_GAN), "full_charbonnier"
    ),
    "stressed": Variant("vanilla DMD2, TTUR 1 (stressed)", (*_VANILLA, _TTUR1), "vanilla"),
    "stressed_ida": Variant("+IDA, TTUR 1 (stressed)", (_NO_ISG, _NO_GAN, _TTUR1), "stressed"),
    "stressed_full": Variant("full, TTUR 1 (stressed)", (_TTUR1,), "stressed"),
    "high_lr": Variant("vanilla DMD2, LR 5e-4 (stressed)", (*_VANILLA, *_HIGH_LR), "vanilla"),
    "high_lr_ida": Variant("+IDA, LR 5e-4 (stressed)", (_NO_ISG, _NO_GAN, *_HIGH_LR), "high_lr"),
    # the rest of the stress grid: backward simulation, ISG alone and the full recipe under stress
    "stressed_no_bs": Variant(
        "no backward simulation, TTUR 1 (stressed)", (*_VANILLA, _NO_BS, _TTUR1), "stressed"
    ),
    "stressed_isg": Variant("+ISG (L2, w 1), TTUR 1 (stressed)", (_NO_IDA, _NO_GAN, _TTUR1), "stressed"),
    "stressed_isg_charbonnier": Variant(
        "+ISG (Charbonnier, w 1), TTUR 1 (stressed)", (_NO_IDA, _NO_GAN, _CHARBONNIER, _TTUR1), "stressed_isg"
    ),
    "high_lr_no_bs": Variant(
        "no backward simulation, LR 5e-4 (stressed)",
        (*_VANILLA, _NO_BS, *_HIGH_LR),
        "high_lr",
    ),
    "high_lr_isg": Variant("+ISG (L2, w 1), LR 5e-4 (stressed)", (_NO_IDA, _NO_GAN, *_HIGH_LR), "high_lr"),
    "high_lr_isg_charbonnier": Variant(
        "+ISG (Charbonnier, w 1), LR 5e-4 (stressed)",
        (_NO_IDA, _NO_GAN, _CHARBONNIER, *_HIGH_LR),
        "high_lr_isg",
    ),
    "high_lr_full": Variant("full, LR 5e-4 (stressed)", _HIGH_LR, "high_lr"),
    # The official code's quirk: the generator's adversarial gradient stays in D's heads' .grad and
    # is added to D's next update (the recipe, like the schema's default, leaves it off).
    "full_leak": Variant("full, official grad leak", ("method.gan.official_grad_leak=true",), "full"),
}
#: The ablation set's variants, the arms of docs/results/toy_ablation.md (the stressed arms, ISG
#: weights and the GAN with the Charbonnier: the stressed set; full_leak: the grad_leak set).
DEFAULT_VARIANTS = ("vanilla", "ida", "isg", "isg_charbonnier", "isg_charbonnier_cfg2", "full")
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
    # The arms that toy_ablation.md leaves out, all trained on one machine with their own vanilla
    # baseline (listed first); --jobs starts them in this order, the most telling first.
    "stressed": VariantSet(
        "the fake score under stress (TTUR 1, a 5x learning rate), backward simulation and ISG weights",
        (
            "vanilla",
            "stressed",
            "stressed_ida",
            "high_lr",
            "high_lr_ida",
            "stressed_full",
            "no_bs",
            "isg",
            "isg_l2_w3",
            "isg_charbonnier",
            "isg_charbonnier_w02",
            "full",
            "full_charbonnier",
            "full_no_gan_charbonnier",
            # the rest of the grid (trained for docs/results/toy_ablation_stressed_cpu.md)
            "stressed_no_bs",
            "stressed_isg",
            "stressed_isg_charbonnier",
            "high_lr_no_bs",
            "high_lr_isg",
            "high_lr_isg_charbonnier",
            "high_lr_full",
        ),
        BASELINE,
        "toy_ablation_stressed",
    ),
}
DEFAULT_SET = "ablation"
