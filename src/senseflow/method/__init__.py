"""The SenseFlow method as small pure functions, separate from the networks (spec §2-8).

Networks enter only as callables ``fn(x, level)``; family differences are carried by a
:class:`senseflow.core.Parameterisation`. Hyperparameters are arguments taken from the recipe.

* :mod:`~senseflow.method.dmd` — DMD loss, level and guidance draws (§3).
* :mod:`~senseflow.method.fake_score` — fake-score denoising loss (§4).
* :mod:`~senseflow.method.ida` — implicit distribution alignment (§5).
* :mod:`~senseflow.method.ida_lora` — IDA between two LoRA adapters on one base (§5, LoRA mode).
* :mod:`~senseflow.method.isg` — intra-segment guidance (§6).
* :mod:`~senseflow.method.backward_sim` — backward simulation and student samplers (§7).
* :mod:`~senseflow.method.gan` — GAN losses and time weights (§8).
* :mod:`~senseflow.method.diffaug` — DiffAugment of the discriminator's input (§8.1).
"""

from senseflow.method.backward_sim import X0Fn, as_x0_fn, backward_simulate, student_sample
from senseflow.method.diffaug import DiffAugParams, diffaug, draw_diffaug_params, neutral_diffaug_params
from senseflow.method.dmd import DMDOutput, dmd_loss, draw_guidance, sample_levels
from senseflow.method.fake_score import fake_score_loss
from senseflow.method.gan import (
    GAN_LOSSES,
    TimeWeight,
    hinge_d_loss,
    hinge_g_loss,
    nonsaturating_d_loss,
    nonsaturating_g_loss,
    time_weight,
)
from senseflow.method.ida import check_ida_compatible, ida_update_
from senseflow.method.ida_lora import (
    IDA_LORA_VARIANTS,
    IdaLoraVariant,
    LoraIdaReport,
    check_ida_lora_compatible,
    ida_lora_update_,
    mix_lora_products,
)
from senseflow.method.isg import (
    ISGTargets,
    OutputFn,
    isg_loss,
    isg_targets,
    isg_x0_targets,
    sample_t_mid,
    segment_ends,
)

__all__ = [
    "GAN_LOSSES",
    "IDA_LORA_VARIANTS",
    "DMDOutput",
    "DiffAugParams",
    "ISGTargets",
    "IdaLoraVariant",
    "LoraIdaReport",
    "OutputFn",
    "TimeWeight",
    "X0Fn",
    "as_x0_fn",
    "backward_simulate",
    "check_ida_compatible",
    "check_ida_lora_compatible",
    "diffaug",
    "dmd_loss",
    "draw_diffaug_params",
    "draw_guidance",
    "fake_score_loss",
    "hinge_d_loss",
    "hinge_g_loss",
    "ida_lora_update_",
    "ida_update_",
    "isg_loss",
    "isg_targets",
    "isg_x0_targets",
    "mix_lora_products",
    "neutral_diffaug_params",
    "nonsaturating_d_loss",
    "nonsaturating_g_loss",
    "sample_levels",
    "sample_t_mid",
    "segment_ends",
    "student_sample",
    "time_weight",
]
