"""Real ``Distiller`` iterations on linear stub networks, checked against the iteration written by hand.

The method's unit tests prove each loss alone; these prove the loop wires them: which network gets
which term's gradient, with which weight and sign, on which (detached) samples, from which draws,
and when IDA and each update run. The family of ``tests/linear_family.py`` makes every network a
per-pixel linear map, so every expected value below is a closed form computed here with plain torch
(autograd over hand-written formulas), never with senseflow's step or method functions. Only the
iteration's random numbers are re-drawn with ``draw_step``; ``test_draws_follow_the_recipe`` checks
those draws on their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from senseflow.train.draws import draw_step
from senseflow.train.trainer import Distiller
from tests import linear_family as lf

GRAD_TOL = {"rtol": 1e-4, "atol": 1e-6}  # float32 throughout; the closed forms differ only in rounding
EXACT_TOL = {"rtol": 1e-6, "atol": 1e-7}


# ---------------------------------------------------------------------------------------------- set-up


@pytest.fixture
def make_run(tmp_path, monkeypatch):
    """``make_run(*overrides)``: a Distiller on the linear family (registered for this test only)."""
    lf.register(monkeypatch)
    teacher = lf.write_teacher(tmp_path / "teacher")

    def make(*overrides: str) -> Distiller:
        return Distiller(lf.linear_cfg(teacher, tmp_path / "run", *overrides), progress=False)

    return make


@dataclass
class Update:
    """One optimiser step: the gradients it applied and the parameters around it, by name."""

    network: str
    iteration: int
    grads: dict[str, torch.Tensor]
    before: dict[str, torch.Tensor]
    after: dict[str, torch.Tensor] = field(default_factory=dict)


class Updates:
    """Every optimiser step of a run, recorded by the optimisers' own step hooks (so nothing of the
    trainer is replaced): what each network was updated with, before the optimiser touched it."""

    def __init__(self, run: Distiller):
        self.run, self.log = run, []
        for name, opt in run.optimizers.items():
            module = getattr(run, name)
            names = {id(p): n for n, p in module.named_parameters()}
            opt.register_step_pre_hook(self._pre(name, names))
            opt.register_step_post_hook(self._post(names))

    def _pre(self, network, names):
        def hook(opt, args, kwargs):
            params = [p for group in opt.param_groups for p in group["params"]]
            grads = {names[id(p)]: p.grad.detach().clone() for p in params}
            before = {names[id(p)]: p.detach().clone() for p in params}
            self.log.append(Update(network, self.run.iteration, grads, before))

        return hook

    def _post(self, names):
        def hook(opt, args, kwargs):
            params = [p for group in opt.param_groups for p in group["params"]]
            self.log[-1].after = {names[id(p)]: p.detach().clone() for p in params}

        return hook

    def of(self, network: str, iteration: int) -> list[Update]:
        return [u for u in self.log if u.network == network and u.iteration == iteration]


def params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def leaves(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone().requires_grad_(True) for k, v in values.items()}


def assert_all_close(actual: dict, expected: dict, what: str, tol=GRAD_TOL) -> None:
    assert actual.keys() == expected.keys(), what
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], **tol, msg=lambda m, k=k: f"{what} {k}: {m}")


# ------------------------------------------------------------------------- the iteration, by hand


def col(v: torch.Tensor) -> torch.Tensor:
    """A per-sample value broadcast over [C, H, W]."""
    return v.reshape(-1, 1, 1, 1)


def linear_map(p: dict, x: torch.Tensor, sigma: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """The family's network, v = mix·x + level_gain·σ + cond_proj·emb per pixel."""
    b, c, h, w = x.shape
    mixed = (p["mix"] @ x.reshape(b, c, h * w)).reshape(b, c, h, w)
    return (
        mixed + p["level_gain"].reshape(1, -1, 1, 1) * col(sigma) + (emb @ p["cond_proj"].T)[:, :, None, None]
    )


def guided(p: dict, x, sigma, emb, scale) -> torch.Tensor:
    """CFG as the recipe writes it (uncond_plus), the unconditional branch being the empty prompt (0)."""
    uncond = linear_map(p, x, sigma, torch.zeros_like(emb))
    return uncond + col(scale) * (linear_map(p, x, sigma, emb) - uncond)


def disc_logits(q: dict, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    per_pixel = (
        (q["weight"].reshape(1, -1, 1, 1) * x).sum(1) + q["bias"] + (emb @ q["cond_weight"])[:, None, None]
    )
    return per_pixel.flatten(1)


@dataclass
class Iteration:
    """Everything an iteration reads: the data, the draws, the networks at its start, and the levels."""

    cfg: object
    x_real: torch.Tensor
    emb: torch.Tensor
    d: object
    theta: dict  # generator
    phi: dict  # fake score
    teacher: dict
    disc: dict
    levels: torch.Tensor  # a_0 .. a_{K-1}, 0

    @property
    def sigma_j(self):
        return self.levels[self.d.anchor_index]

    @property
    def omega(self):
        """alpha_sq: (1 - σ_j)² at the sample's anchor."""
        return (1 - self.sigma_j) ** 2


def iteration_inputs(run: Distiller) -> Iteration:
    """The data and draws of ``run``'s next iteration and its networks now (call it before train_step)."""
    cfg, n = run.cfg, run.iteration
    batch = lf.batch_at(cfg.seed, n, cfg.data.batch_size, cfg.data.resolution)
    emb = torch.tensor([[float(v) for v in p.split()] for p in batch.prompts])
    shape = tuple(batch.images.shape[1:])
    size = cfg.data.batch_size
    d = draw_step(cfg.method, run.param, run.anchor_levels, shape, size, size, cfg.seed, n)
    # shift 1: the anchors' σ are the recipe's t values; the last segment ends at σ = 0
    levels = torch.tensor([*cfg.model.anchors.values, 0.0])
    return Iteration(
        cfg, batch.images, emb, d, params(run.generator), params(run.fake_score), params(run.teacher),
        params(run.discriminator), levels,
    )  # fmt: skip


def generator_input(it: Iteration, simulate: torch.Tensor) -> torch.Tensor:
    """Forward-noised data, or the generator's own chain from a_0 to a_j with fresh noise each step."""
    d, levels, j = it.d, it.levels, it.d.anchor_index
    noised = (1 - col(it.sigma_j)) * it.x_real + col(it.sigma_j) * d.input_noise
    x = d.input_noise
    for step in range(len(levels) - 2):
        a, a_next = levels[step].expand(len(j)), levels[step + 1].expand(len(j))
        x0 = x - col(a) * linear_map(it.theta, x, a, it.emb)
        x_next = (1 - col(a_next)) * x0 + col(a_next) * d.simulation_noise[step]
        x = torch.where(col(j > step), x_next, x)
    return torch.where(col(simulate), x, noised)


def generator_x0(theta: dict, it: Iteration, x_in: torch.Tensor) -> torch.Tensor:
    return x_in - col(it.sigma_j) * linear_map(theta, x_in, it.sigma_j, it.emb)


def generator_objective(
    theta: dict,
    it: Iteration,
    *,
    dmd_sign: float = 1.0,
    time_weighted: bool = True,
    isg_swapped: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DMD + w_gan·L_adv + w_isg·ISG at generator weights ``theta`` (leaves). The keyword arguments give
    the objective of a broken trainer (sign of DMD flipped, GAN time weight dropped, ISG's teacher and
    student swapped), for checking that the assertions can tell them apart."""
    m, d = it.cfg.method, it.d
    x_in = generator_input(it, d.simulate)
    sigma_j, sigma_next = it.sigma_j, it.levels[d.anchor_index + 1]
    out = linear_map(theta, x_in, sigma_j, it.emb)
    x0 = x_in - col(sigma_j) * out
    # DMD: x0 is pushed toward the teacher's x̂0 and away from the fake score's, by their difference
    # over mean|x0 - x̂0_real|, per element 1/N (the mean): d DMD / d x0 = push / N.
    with torch.no_grad():
        tau = d.dmd_level
        x_t = (1 - col(tau)) * x0 + col(tau) * d.dmd_noise
        x0_fake = x_t - col(tau) * linear_map(it.phi, x_t, tau, it.emb)
        x0_real = x_t - col(tau) * guided(it.teacher, x_t, tau, it.emb, d.dmd_guidance)
        normaliser = (x0 - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
        push = dmd_sign * (x0_fake - x0_real) / normaliser
    dmd = (push * x0).sum() / x0.numel()
    # Hinge adversarial term: -D(x0) averaged per sample, weighted by (1 - σ_j)², mean over the batch.
    omega = it.omega if time_weighted else torch.ones_like(it.omega)
    adv = (omega * -disc_logits(it.disc, x0, it.emb).mean(1)).mean()
    # ISG: the teacher steps a_j -> t_mid (Euler, ISG guidance), the generator t_mid -> a_{j+1}; the
    # generator's one Euler jump a_j -> a_{j+1} regresses onto that (the recipe's loss: squared L2 or
    # the official code's Charbonnier).
    sigma_mid = (d.isg_mid_grid + 1).float() / 1000  # table position i is σ = (i + 1) / 1000 at shift 1

    def teacher_fn(x, s):
        return guided(it.teacher, x, s, it.emb, d.isg_guidance)

    def student_fn(x, s):
        return linear_map(theta, x, s, it.emb)

    if isg_swapped:
        teacher_fn, student_fn = student_fn, teacher_fn
    with torch.no_grad():
        x_mid = x_in + col(sigma_mid - sigma_j) * teacher_fn(x_in, sigma_j)
        x_target = x_mid + col(sigma_next - sigma_mid) * student_fn(x_mid, sigma_mid)
    diff = x_in + col(sigma_next - sigma_j) * out - x_target
    if m.isg.loss == "charbonnier":
        eps = m.isg.charbonnier_eps
        isg = (torch.sqrt(diff * diff + eps * eps) - eps).mean()
    else:
        isg = (diff * diff).mean()
    total = dmd + m.gan.weight * adv + m.isg.weight * isg
    return total, {"adv": adv, "isg": isg}


def grads_of(objective, at: dict) -> dict[str, torch.Tensor]:
    x = leaves(at)
    values = torch.autograd.grad(objective(x), list(x.values()))
    return dict(zip(x, values, strict=True))


def fake_objective(phi: dict, it: Iteration, x0: torch.Tensor) -> torch.Tensor:
    """Flow matching of the fake score on the generator's sample x0 (a constant): MSE(v, ε - x0)."""
    tau, eps = it.d.fake_level, it.d.fake_noise
    x_t = (1 - col(tau)) * x0 + col(tau) * eps
    return ((linear_map(phi, x_t, tau, it.emb) - (eps - x0)) ** 2).mean()


def disc_objective(q: dict, it: Iteration, x0: torch.Tensor) -> torch.Tensor:
    """Hinge: mean_b ω_b [mean ReLU(1 - D(real_b)) + mean ReLU(1 + D(fake_b))], times disc_weight."""
    per_sample = F.relu(1 - disc_logits(q, it.x_real, it.emb)).mean(1)
    per_sample = per_sample + F.relu(1 + disc_logits(q, x0, it.emb)).mean(1)
    return it.cfg.method.gan.disc_weight * (it.omega * per_sample).mean()


def relative_gap(a: dict, b: dict) -> float:
    num = sum(float((a[k] - b[k]).square().sum()) for k in a)
    den = sum(float(b[k].square().sum()) for k in b)
    return (num / den) ** 0.5


# ---------------------------------------------------------------------------------------------- tests

# period_end with period 2: iteration 0 trains the fake score and D only, iteration 1 also G.
TWO_TURNS = ("method.ttur_ratio=2", "method.ttur_generator_turn=period_end", "schedule.iterations=2")


def check_draws_cover(it: Iteration) -> None:
    """The batch must hold simulated and data inputs and several anchors, else the test proves little."""
    d = it.d
    assert d.simulate.any() and (~d.simulate).any()
    assert (d.simulate & (d.anchor_index > 1)).any()
    assert len(set(d.anchor_index.tolist())) >= 3
    assert len(set(it.omega.tolist())) >= 3  # the GAN time weights differ across the batch


@pytest.mark.parametrize("isg_loss", ["l2", "charbonnier"])
def test_generator_gradient_is_the_hand_derived_objective(make_run, isg_loss):
    """G's update applies exactly the gradient of DMD + w_gan·L_adv + w_isg·ISG (clipping off), with
    DMD's sign, ISG's teacher/student roles and the GAN's time weight as the method has them."""
    run = make_run(*TWO_TURNS, f"method.isg.loss={isg_loss}")
    updates = Updates(run)
    run.train_step()
    it = iteration_inputs(run)
    check_draws_cover(it)
    logs = run.train_step()
    (update,) = updates.of("generator", 1)

    def objective(theta, **broken):
        return generator_objective(theta, it, **broken)[0]

    expected = grads_of(objective, it.theta)
    assert_all_close(update.grads, expected, "generator gradient")
    with torch.no_grad():
        _, parts = generator_objective(it.theta, it)
    assert logs["loss_adv"] == pytest.approx(float(parts["adv"]), rel=1e-4)
    assert logs["loss_isg"] == pytest.approx(float(parts["isg"]), rel=1e-4)
    # The closed form tells each broken wiring apart, far beyond the tolerance.
    for broken in ({"dmd_sign": -1.0}, {"time_weighted": False}, {"isg_swapped": True}):
        wrong = grads_of(lambda theta, b=broken: objective(theta, **b), it.theta)
        assert relative_gap(wrong, expected) > 1e-2, broken


def test_fake_score_and_discriminator_learn_only_their_own_losses(make_run):
    """The fake score's gradient is its denoising loss on the generator's pre-update, detached sample;
    D's is its hinge loss; neither reaches G: G does not move outside its turn, and on its turn its
    gradient after the whole iteration is still the one its update applied."""
    run = make_run(*TWO_TURNS)
    updates = Updates(run)
    for n in range(2):
        it = iteration_inputs(run)
        run.train_step()
        x0 = generator_x0(it.theta, it, generator_input(it, it.d.simulate)).detach()
        (fake,) = updates.of("fake_score", n)
        # On G's turn the fake score has been moved by IDA first (checked by the IDA test).
        expected = grads_of(lambda phi, it=it, x0=x0: fake_objective(phi, it, x0), fake.before)
        assert_all_close(fake.grads, expected, f"fake-score gradient, iteration {n}")
        (disc,) = updates.of("discriminator", n)
        expected = grads_of(lambda q, it=it, x0=x0: disc_objective(q, it, x0), it.disc)
        assert_all_close(disc.grads, expected, f"discriminator gradient, iteration {n}")
        if n == 0:
            assert not updates.of("generator", n)
            assert_all_close(params(run.generator), it.theta, "generator outside its turn", EXACT_TOL)
        else:
            (gen,) = updates.of("generator", n)
            expected = grads_of(lambda theta, it=it: generator_objective(theta, it)[0], it.theta)
            grads = {k: p.grad for k, p in run.generator.named_parameters()}
            assert_all_close(grads, expected, "generator gradient after the iteration")
            assert_all_close(grads, gen.grads, "generator gradient after the iteration", EXACT_TOL)
            assert_all_close(params(run.generator), gen.after, "generator after its update", EXACT_TOL)


def test_ida_pulls_the_fake_score_to_the_updated_generator(make_run):
    """After G's update, before the fake score's own: φ = λ·φ_before + (1 - λ)·θ_updated."""
    run = make_run("method.ida.lam=0.97", "method.ttur_generator_turn=period_start", "schedule.iterations=1")
    updates = Updates(run)
    phi0, theta0 = params(run.fake_score), params(run.generator)
    run.train_step()
    (gen,) = updates.of("generator", 0)
    (fake,) = updates.of("fake_score", 0)
    lam = run.cfg.method.ida.lam
    expected = {k: lam * phi0[k] + (1 - lam) * gen.after[k] for k in phi0}
    assert_all_close(fake.before, expected, "fake score after IDA", EXACT_TOL)
    # The generator moved enough that IDA toward its pre-update weights would fail the check above.
    stale = {k: lam * phi0[k] + (1 - lam) * theta0[k] for k in phi0}
    assert min(float((stale[k] - expected[k]).abs().max()) for k in stale) > 1e-5


@pytest.mark.parametrize("prob", [0.0, 1.0])
def test_generator_input_follows_the_simulation_switch(make_run, prob):
    """backward_sim_prob 1: G's input is its own chain a_0 -> a_j (one G call per step before it);
    0: the data noised to a_j. G's input is read off its forward calls."""
    run = make_run(
        f"method.backward_sim_prob={prob}", "method.ttur_ratio=5", "method.ttur_generator_turn=period_end"
    )
    calls = []
    run.generator.register_forward_hook(lambda m, args, out: calls.append((args[0].clone(), args[1].clone())))
    it = iteration_inputs(run)
    j = it.d.anchor_index
    assert (j > 1).any()
    simulate = torch.full_like(it.d.simulate, prob == 1.0)  # from the recipe, not from the draws
    steps = int(j.max()) if prob == 1.0 else 0
    run.train_step()  # not G's turn: the simulation's calls, then G's output, nothing else
    assert len(calls) == steps + 1
    x, level = calls[steps]
    torch.testing.assert_close(level, it.sigma_j)
    torch.testing.assert_close(x, generator_input(it, simulate), **GRAD_TOL)
    other = generator_input(it, ~simulate)
    assert float((x - other).abs().max()) > 1e-2  # the two inputs are told apart


@pytest.mark.parametrize(
    ("turn", "generator_iterations"), [("period_end", {2, 5}), ("period_start", {0, 3, 6})]
)
def test_ttur_schedule(make_run, turn, generator_iterations):
    """With ttur_ratio 3, G updates at 2, 5 (period_end) or 0, 3, 6 (period_start); the fake score and D
    every iteration; G's weights change on its turns only."""
    run = make_run("method.ttur_ratio=3", f"method.ttur_generator_turn={turn}", "schedule.iterations=7")
    updates = Updates(run)
    for n in range(7):
        before = params(run.generator)
        logs = run.train_step()
        assert len(updates.of("fake_score", n)) == 1
        assert len(updates.of("discriminator", n)) == 1
        turn_now = n in generator_iterations
        assert len(updates.of("generator", n)) == int(turn_now), n
        assert logs["generator_turn"] == float(turn_now)
        moved = any(not torch.equal(before[k], v) for k, v in params(run.generator).items())
        assert moved == turn_now, n


def test_draws_follow_the_recipe(make_run):
    """Over 4000 samples of the trainer's own draws (fixed seed, so no flakiness): the anchor is
    uniform over the K anchors, backward simulation has probability backward_sim_prob, the DMD level is
    uniform over grid positions [20, 980], the fake level is logit-normal(0, 1), t_mid is uniform inside
    its segment's margins and the guidance draws follow their ranges."""
    run = make_run("method.backward_sim_prob=0.3")
    m, size, shape = run.cfg.method, run.cfg.data.batch_size, (lf.CHANNELS, 4, 4)
    draws = [run.draws(n, shape)[0] for n in range(500)]

    def cat(name):
        return torch.cat([getattr(d, name) for d in draws])

    n = 500 * size
    anchors, simulate = cat("anchor_index"), cat("simulate")
    K = len(run.cfg.model.anchors.values)
    assert stats.chisquare(torch.bincount(anchors, minlength=K).numpy()).pvalue > 1e-3
    p = m.backward_sim_prob
    assert abs(int(simulate.sum()) - p * n) < 4.5 * (n * p * (1 - p)) ** 0.5
    for j in range(K):  # the switch is drawn apart from the anchor
        at_j = simulate[anchors == j].float()
        assert abs(float(at_j.mean()) - p) < 4.5 * (p * (1 - p) / len(at_j)) ** 0.5
    dist = m.dmd.timestep_dist
    assert dist.kind == "uniform_index"
    grid = torch.round(cat("dmd_level") * 1000).long() - 1  # σ = (i + 1) / 1000 at shift 1
    assert int(grid.min()) >= dist.low and int(grid.max()) <= dist.high
    width, bins = dist.high - dist.low + 1, 20  # 20 bins of (nearly) equal numbers of grid positions
    expected = torch.bincount(torch.arange(width) * bins // width, minlength=bins).double() * n / width
    counts = torch.bincount((grid - dist.low) * bins // width, minlength=bins)
    assert stats.chisquare(counts.numpy(), expected.numpy()).pvalue > 1e-3
    fake, dist = cat("fake_level").double(), m.fake.timestep_dist
    assert dist.kind == "logit_normal" and not dist.apply_shift
    logit = torch.log(fake / (1 - fake)).numpy()
    assert stats.kstest(logit, "norm", args=(dist.mean, dist.std)).pvalue > 1e-3
    g = m.dmd.teacher_guidance
    assert stats.kstest(cat("dmd_guidance").numpy(), "uniform", args=(g.min, g.max - g.min)).pvalue > 1e-3
    g = m.isg.teacher_guidance
    assert g.fixed and torch.all(cat("isg_guidance") == g.min)
    # grid positions of a_0 .. a_{K-1} and of the clean end (0); t_mid ~ U[g(a_{j+1}) + m, g(a_j) - m]
    ends = torch.tensor([*(round(a * 1000) - 1 for a in run.cfg.model.anchors.values), 0])
    hi, lo = ends[anchors] - m.isg.margin, ends[anchors + 1] + m.isg.margin
    mid = cat("isg_mid_grid")
    assert torch.all((mid >= lo) & (mid <= hi))
    jitter = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    position = ((mid - lo).double() + jitter) / (hi - lo + 1).double()  # continuous U[0, 1) if uniform
    assert stats.kstest(position.numpy(), "uniform").pvalue > 1e-3


# ------------------------------------------------------------------------- optimisers from the recipe

NETWORKS = {"generator": "generator", "fake": "fake_score", "discriminator": "discriminator"}


def _norm(grads: dict[str, torch.Tensor]) -> float:
    return torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())).item()


def test_clip_grad_caps_the_gradient_each_optimiser_applies(make_run):
    """``optim.*.clip_grad``: every update applies the gradient scaled to total norm ``clip`` when it is
    longer, in the unclipped gradient's direction (compared with the same iteration unclipped)."""
    clip = 1e-3
    free = make_run()
    clipped = make_run(*(f"optim.{n}.clip_grad={clip}" for n in NETWORKS))
    logs = []
    for run in (free, clipped):
        updates = Updates(run)
        run.train_step()  # iteration 0: every network updates (period_start)
        logs.append(updates)
    for network in NETWORKS.values():
        (a,), (b,) = logs[0].of(network, 0), logs[1].of(network, 0)
        assert _norm(a.grads) > 10 * clip  # the test needs gradients longer than the clip
        assert _norm(b.grads) == pytest.approx(clip, rel=1e-4)
        if network != "fake_score":  # the fake score's update follows IDA, which differs between the runs
            scale = clip / _norm(a.grads)
            assert_all_close(b.grads, {k: g * scale for k, g in a.grads.items()}, f"clipped {network}")


def test_optimisers_are_built_from_the_recipe(make_run):
    """Each network's AdamW carries its own recipe entry's betas, eps, weight decay and learning rate."""
    settings = {
        "generator": ((0.8, 0.95), 1e-6, 0.01, 3e-3),
        "fake": ((0.7, 0.9), 1e-7, 0.02, 2e-3),
        "discriminator": ((0.6, 0.85), 1e-5, 0.03, 1e-3),
    }
    overrides = []
    for net, (betas, eps, wd, lr) in settings.items():
        overrides += [
            f"optim.{net}.betas=[{betas[0]},{betas[1]}]",
            f"optim.{net}.eps={eps}",
            f"optim.{net}.weight_decay={wd}",
            f"optim.{net}.lr={lr}",
        ]
    run = make_run(*overrides)
    for net, (betas, eps, wd, lr) in settings.items():
        optimizer = run.optimizers[NETWORKS[net]]
        assert isinstance(optimizer, torch.optim.AdamW)
        (group,) = optimizer.param_groups
        assert tuple(group["betas"]) == pytest.approx(betas)
        assert (group["eps"], group["weight_decay"], group["initial_lr"]) == pytest.approx((eps, wd, lr))
        module = getattr(run, NETWORKS[net])
        held = module.trainable_parameters() if net == "discriminator" else module.parameters()
        assert {id(p) for p in group["params"]} == {id(p) for p in held}
