"""The mutants of ``mutations.py``: plausible one-line bugs of the training loop and its method code.

Each is data: the exact source text (unique in its file, so the list cannot silently go stale; see
``tests/test_mutations_list.py``), what replaces it, and the tests that should catch it, in the order
they run (the cheapest and most likely killer first). ``caught_by`` says which check is meant to kill
the mutant; the report repeats it for survivors, as the test that is still missing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    original: str  # occurs exactly once in ``file``
    replacement: str
    tests: tuple[str, ...]  # pytest files or node ids, relative to the repository root
    caught_by: str


STEP = "src/senseflow/train/step.py"
TRAINER = "src/senseflow/train/trainer.py"
DRAWS = "src/senseflow/train/draws.py"
STARTUP = "src/senseflow/train/startup.py"

CLOSED_FORM = "tests/test_trainer_closed_form.py"
FIDELITY = "tests/test_official_fidelity.py"


def loop(*names: str) -> tuple[str, ...]:
    return tuple(f"tests/test_trainer.py::{n}" for n in names)


# The in-process tests of the real loop on the tiny toy teacher, cheapest first (the torchrun ones
# run the same code on both sides of their comparison, so they cannot tell a mutant apart).
LOOP = loop(
    "test_training_changes_generator_and_logs_health",
    "test_ida_moves_fake_toward_generator",
    "test_the_generator_updates_on_the_recipes_ttur_turns",
    "test_every_optimiser_warms_up_per_iteration_as_the_official_scheduler",
    "test_dmd2_head_trains_and_logs_finite_losses",
    "test_dmd2_head_loss_trains_the_fake_score",
    "test_nan_guard_skips_then_aborts",
    "test_resume_is_bit_exact",
)
TRAINING = (CLOSED_FORM, *LOOP)

SANITY = Mutation(
    name="sanity_dmd_loss_halved",
    file="src/senseflow/method/dmd.py",
    original='loss = 0.5 * F.mse_loss(x.float(), target, reduction="mean")',
    replacement='loss = 0.25 * F.mse_loss(x.float(), target, reduction="mean")',
    tests=("tests/test_method_dmd.py::test_autograd_gradient_is_grad_over_n",),
    caught_by="test_method_dmd's autograd check; run first, a survivor means the copy is not what runs",
)

MUTATIONS: tuple[Mutation, ...] = (
    # ------------------------------------------------------------------ the generator's objective (step.py)
    Mutation(
        "dmd_sign_flipped_at_call",
        STEP,
        "dmd = dmd_loss(x0, x0_fake, x0_real)",
        "dmd = dmd_loss(x0, x0_real, x0_fake)",
        TRAINING,
        "the closed-form generator gradient (DMD pushes toward the teacher, away from the fake score)",
    ),
    Mutation(
        "isg_teacher_student_swapped",
        STEP,
        "t = isg_targets(x_in, level_j, level_next, level_mid, teacher, student, out_in, p)",
        "t = isg_targets(x_in, level_j, level_next, level_mid, student, teacher, out_in, p)",
        TRAINING,
        "the closed-form generator gradient (ISG: the teacher steps to t_mid, G finishes)",
    ),
    Mutation(
        "gan_time_weights_ignored",
        STEP,
        'return time_weight(self.m.gan.time_weight or "constant", level_j, self.param)',
        "return torch.ones_like(level_j, dtype=torch.float32)",
        TRAINING,
        "the closed-form generator and D gradients with alpha_sq weights that differ across the batch",
    ),
    Mutation(
        "gan_weight_ignored",
        STEP,
        "total = total + m.gan.weight * adv",
        "total = total + adv",
        TRAINING,
        "the closed-form generator gradient at gan.weight != 1",
    ),
    Mutation(
        "isg_weight_ignored",
        STEP,
        "total = total + m.isg.weight * isg",
        "total = total + isg",
        TRAINING,
        "a closed-form generator gradient at isg.weight != 1 (the recipes use 1)",
    ),
    Mutation(
        "isg_skipped",
        STEP,
        "if m.isg.weight > 0:",
        "if m.isg.weight < 0:",
        TRAINING,
        "the loop logging loss_isg, and the closed-form generator gradient",
    ),
    Mutation(
        "isg_eps_ignored",
        STEP,
        "isg = isg_loss(t.x_direct, t.x_target, m.isg.loss, m.isg.charbonnier_eps)",
        "isg = isg_loss(t.x_direct, t.x_target, m.isg.loss, 1.0)",
        TRAINING,
        "the closed-form generator gradient (Charbonnier eps 1e-3 of the recipe)",
    ),
    Mutation(
        "isg_segment_end_clean",
        STEP,
        "level_j, level_next = self.levels[d.anchor_index], self.levels[d.anchor_index + 1]",
        "level_j, level_next = self.levels[d.anchor_index], self.levels[-1].expand_as(d.anchor_index)",
        TRAINING,
        "the closed-form generator gradient (ISG's segment ends at the next anchor a_{j+1})",
    ),
    Mutation(
        "dmd_teacher_guidance_ignored",
        STEP,
        "nets.teacher(x_t, d.dmd_level, cond, d.dmd_guidance)",
        "nets.teacher(x_t, d.dmd_level, cond, torch.ones_like(d.dmd_guidance))",
        TRAINING,
        "the closed-form generator gradient (the teacher's CFG at the drawn DMD guidance)",
    ),
    Mutation(
        "simulation_from_data",
        STEP,
        "            d.input_noise,\n            self.anchor_levels,",
        "            x_real,\n            self.anchor_levels,",
        (CLOSED_FORM, *LOOP),
        "the generator-input test at backward_sim_prob 1 (the chain starts from noise at a_0)",
    ),
    Mutation(
        "fake_loss_at_dmd_level",
        STEP,
        "x_t = p.add_noise(x0, d.fake_noise, d.fake_level)",
        "x_t = p.add_noise(x0, d.fake_noise, d.dmd_level)",
        TRAINING,
        "the closed-form fake-score gradient (noised to its own level)",
    ),
    Mutation(
        "disc_real_fake_swapped",
        STEP,
        "real_logits, fake_logits = logits.chunk(2)",
        "fake_logits, real_logits = logits.chunk(2)",
        TRAINING,
        "the closed-form discriminator gradient",
    ),
    # ------------------------------------------------------------------ the loop (trainer.py)
    Mutation(
        "fake_input_not_detached",
        TRAINER,
        "        x0 = x0.detach()\n",
        "        x0 = x0\n",
        TRAINING,
        "the loop's fake-score update after G's turn (the fake loss must not reach G's graph)",
    ),
    Mutation(
        "ttur_period_end_off_by_one",
        TRAINER,
        '(n + 1) % ratio == 0 if turn == "period_end"',
        'n % ratio == 0 if turn == "period_end"',
        TRAINING,
        "the TTUR schedule tests (period_end: G at 2, 5 for ratio 3)",
    ),
    Mutation(
        "ttur_period_start_off_by_one",
        TRAINER,
        'if turn == "period_end" else n % ratio == 0',
        'if turn == "period_end" else (n + 1) % ratio == 0',
        TRAINING,
        "the TTUR schedule tests (period_start: G at 0, 3, 6 for ratio 3)",
    ),
    Mutation(
        "ida_skipped",
        TRAINER,
        "logs.update(self.ida())",
        "logs.update({})",
        TRAINING,
        "the IDA tests of the loop",
    ),
    Mutation(
        "generator_not_stepped",
        TRAINER,
        'self.update("generator", total)',
        "total.backward()",
        TRAINING,
        "the loop tests that see G's weights move on its turns",
    ),
    Mutation(
        "zero_grad_skipped",
        TRAINER,
        "if not keep_grads:",
        "if keep_grads:",
        TRAINING,
        "the closed-form gradients of a second update (no accumulation), and bit-exact resume",
    ),
    Mutation(
        "clip_grad_ignored",
        TRAINER,
        "torch.nn.utils.clip_grad_norm_(params, self.clips[name])",
        'torch.nn.utils.clip_grad_norm_(params, float("inf"))',
        TRAINING,
        "test_clip_grad_caps_the_gradient_each_optimiser_applies (the applied norm is the clip)",
    ),
    Mutation(
        "scheduler_not_stepped",
        TRAINER,
        "step_schedulers(self.schedulers)",
        "step_schedulers({})",
        TRAINING,
        "the warm-up test of the loop",
    ),
    Mutation(
        "anchor_level_off_by_one",
        TRAINER,
        "level_j = self.levels[d.anchor_index]\n",
        "level_j = self.levels[d.anchor_index + 1]\n",
        TRAINING,
        "the generator-input test (G is called at its anchor's level a_j)",
    ),
    Mutation(
        "fake_score_not_updated_beside_d",
        TRAINER,
        "fake_alone = disc is None or not disc.shares_fake_update",
        "fake_alone = disc is None",
        TRAINING,
        "the closed-form fake-score update with a discriminator that does not train the fake score",
    ),
    Mutation(
        "data_stream_check_disabled",
        "src/senseflow/train/resume.py",
        "elif saved != current:",
        "elif False:",
        ("tests/test_data_streams.py::test_a_run_is_not_resumed_on_another_data_stream",),
        "test_data_streams' refusal to resume on another data stream",
    ),
    # ------------------------------------------------------------------ the draws (draws.py)
    Mutation(
        "backward_sim_prob_forced_0",
        DRAWS,
        "torch.rand(G, generator=g) < method.backward_sim_prob",
        "torch.rand(G, generator=g) < 0.0",
        (CLOSED_FORM, *LOOP),
        "the generator-input test at backward_sim_prob 1, and the draws' rate test",
    ),
    Mutation(
        "backward_sim_prob_forced_1",
        DRAWS,
        "torch.rand(G, generator=g) < method.backward_sim_prob",
        "torch.rand(G, generator=g) < 1.0",
        (CLOSED_FORM, *LOOP),
        "the generator-input test at backward_sim_prob 0, and the draws' rate test",
    ),
    Mutation(
        "last_anchor_never_drawn",
        DRAWS,
        "torch.randint(0, K, (G,), generator=g)",
        "torch.randint(0, K - 1, (G,), generator=g)",
        (CLOSED_FORM, *LOOP),
        "the draws' test that anchors are uniform over all K",
    ),
    # ------------------------------------------------------------------ the method's formulas
    Mutation(
        "dmd_sign_flipped_in_loss",
        "src/senseflow/method/dmd.py",
        "target = xd - grad",
        "target = xd + grad",
        ("tests/test_method_dmd.py", CLOSED_FORM),
        "test_method_dmd's direction test",
    ),
    Mutation(
        "dmd_normaliser_dropped",
        "src/senseflow/method/dmd.py",
        "grad = torch.nan_to_num((fake - real) / normaliser, nan=0.0)",
        "grad = torch.nan_to_num(fake - real, nan=0.0)",
        ("tests/test_method_dmd.py", CLOSED_FORM),
        "test_method_dmd's closed forms",
    ),
    Mutation(
        "dmd_normaliser_over_batch",
        "src/senseflow/method/dmd.py",
        "normaliser = (xd - real).abs().mean(dim=dims, keepdim=True)",
        "normaliser = (xd - real).abs().mean()",
        ("tests/test_method_dmd.py", CLOSED_FORM),
        "test_method_dmd's hand-computed example (one normaliser per sample)",
    ),
    Mutation(
        "isg_direct_to_t_mid",
        "src/senseflow/method/isg.py",
        "x_direct = param.step_to(x_in, student_output_at_in, level_j, level_next)",
        "x_direct = param.step_to(x_in, student_output_at_in, level_j, level_mid)",
        ("tests/test_method_isg.py", CLOSED_FORM),
        "test_method_isg's exact-oracle test",
    ),
    Mutation(
        "ida_lam_swapped",
        "src/senseflow/method/ida.py",
        "phi.mul_(lam).add_(theta.to(phi.dtype), alpha=1.0 - lam)",
        "phi.mul_(1.0 - lam).add_(theta.to(phi.dtype), alpha=lam)",
        ("tests/test_method_ida.py", CLOSED_FORM, *loop("test_ida_moves_fake_toward_generator")),
        "test_method_ida's closed form at lam 0.97",
    ),
    Mutation(
        "gan_alpha_not_squared",
        "src/senseflow/method/gan.py",
        "return param.alpha(level).float() ** 2",
        "return param.alpha(level).float()",
        ("tests/test_method_gan.py", CLOSED_FORM),
        "test_method_gan's weights at the FLUX anchors",
    ),
    Mutation(
        "hinge_fake_sign",
        "src/senseflow/method/gan.py",
        "F.relu(1.0 + fake_logits.float())",
        "F.relu(1.0 - fake_logits.float())",
        ("tests/test_method_gan.py", CLOSED_FORM),
        "test_method_gan's hinge losses by hand",
    ),
    Mutation(
        "simulation_renoised_to_same_anchor",
        "src/senseflow/method/backward_sim.py",
        "_randn_like(x, generator), _level(anchor_levels, step + 1, B, x.device))",
        "_randn_like(x, generator), _level(anchor_levels, step, B, x.device))",
        ("tests/test_method_backward_sim.py", CLOSED_FORM),
        "test_method_backward_sim's fixed-student closed form",
    ),
    Mutation(
        "simulation_overruns_its_anchor",
        "src/senseflow/method/backward_sim.py",
        "active = (j_t > step)",
        "active = (j_t >= step)",
        ("tests/test_method_backward_sim.py", CLOSED_FORM),
        "test_method_backward_sim's per-sample anchors",
    ),
    Mutation(
        "fake_target_is_x0",
        "src/senseflow/method/fake_score.py",
        "target = param.training_target(x0.detach(), eps, level)",
        "target = x0.detach()",
        ("tests/test_method_fake_score.py", CLOSED_FORM),
        "test_method_fake_score's flow velocity target",
    ),
    # ------------------------------------------------------------------ optimisers (startup.py)
    Mutation(
        "warmup_factor_off_by_one",
        STARTUP,
        "return start + (1 - start) * n / steps if n < steps else 1.0",
        "return start + (1 - start) * (n + 1) / steps if n < steps else 1.0",
        (*loop("test_every_optimiser_warms_up_per_iteration_as_the_official_scheduler"), CLOSED_FORM),
        "the loop's warm-up test (lr_start at iteration 0)",
    ),
    Mutation(
        "adam_betas_reversed",
        STARTUP,
        "betas=cfg.betas,",
        "betas=cfg.betas[::-1],",
        (CLOSED_FORM, *LOOP),
        "test_optimisers_are_built_from_the_recipe (betas, eps, weight decay, lr per network)",
    ),
    # ------------------------------------------------------------------ the official scope and inputs
    Mutation(
        "global_randomness_per_sample",
        DRAWS,
        'group = {"global": values.shape[0], "per_rank": self.per_rank_batch}.get(self.kind, 1)',
        'group = {"per_rank": self.per_rank_batch}.get(self.kind, 1)',
        (FIDELITY,),
        "test_official_fidelity's global-scope test (one anchor, switch and t_mid per iteration)",
    ),
    Mutation(
        "global_levels_not_shared_across_ranks",
        DRAWS,
        'if self.kind != "global":',
        'if self.kind != "global" or True:',
        (FIDELITY,),
        "test_official_fidelity's global-scope test (every rank draws the first rank's levels)",
    ),
    Mutation(
        "pure_noise_first_anchor_ignored",
        STEP,
        "noised = torch.where(pure, d.input_noise, noised)",
        "noised = torch.where(pure, noised, noised)",
        (FIDELITY,),
        "test_official_fidelity's SDXL pure-noise test (G's input at t = 999 is the noise itself)",
    ),
    Mutation(
        "real_pixels_ignored",
        TRAINER,
        'if batch.images is not None and self.cfg.method.gan.real_pixels == "images":',
        "if batch.images is not None:",
        (FIDELITY,),
        "test_official_fidelity's real-pixels test (SDXL's D reads the decoded latents)",
    ),
)

# Mutants considered and left out because no network's update changes (name, file, change, why).
EQUIVALENT: tuple[tuple[str, str, str, str], ...] = (
    (
        "dmd_input_not_detached",
        STEP,
        "x_t = p.add_noise(x0, d.dmd_noise, d.dmd_level).detach() -> without .detach()",
        "x_t is only read inside torch.no_grad(), so no graph is ever built through it",
    ),
    (
        "isg_charbonnier_offset_dropped",
        "src/senseflow/method/isg.py",
        "(torch.sqrt(d * d + eps * eps) - eps).mean() -> torch.sqrt(d * d + eps * eps).mean()",
        "a constant offset: the gradient, hence every update, is the same; only the logged loss_isg moves",
    ),
)
