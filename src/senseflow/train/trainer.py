"""The one distillation loop for every teacher family (spec §2).

Per iteration: draw the anchor and the input (backward simulation or forward-noised data), run the
generator, and every ``ttur_ratio`` iterations update it with DMD + GAN + ISG and then apply IDA;
then update the fake score and the discriminator on the generator's (pre-update) output. Family
differences live in the adapter; hyperparameters come from the recipe; all randomness of an
iteration comes from ``draws.draw_step`` so that resume and world size change nothing.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from senseflow.config.loader import dump_config, save_resolved
from senseflow.config.schema import DistillConfig
from senseflow.data import verify_latent_cache
from senseflow.devices import autocast, reshard, resolve_device, set_tf32, to_dtype
from senseflow.errors import CheckpointError, CheckpointWriteError, Preempted
from senseflow.method import check_ida_compatible, ida_update_
from senseflow.models import build_adapter
from senseflow.models.adapter import NETWORK_ROLES
from senseflow.models.batch import Batch, Conditioning
from senseflow.models.build import build_roles
from senseflow.models.discriminators import build_discriminator
from senseflow.train import checkpoint as ckpt
from senseflow.train.data import BatchLoader, build_stream, stream_identity
from senseflow.train.draws import draw_step
from senseflow.train.health import NonFiniteGuard, collapse_alarm, image_stats, non_finite
from senseflow.train.logbook import Logbook
from senseflow.train.lora_mode import LoraIda, build_lora_roles
from senseflow.train.parallel import device_mesh, is_sharded, shard, shard_policy, wrap
from senseflow.train.preemption import StopOnSignal
from senseflow.train.resume import check_data_stream, resume_run
from senseflow.train.samples import save_sample_grid
from senseflow.train.sharded_checkpoint import ShardedCheckpointer, agree, load_sharded
from senseflow.train.startup import (
    build_optimizer,
    build_schedulers,
    check_buildable,
    check_optimizers,
    check_supported,
    step_schedulers,
    zero_missing_grads,
)
from senseflow.train.step import NetworkCalls, SenseFlowStep


class _Once:
    """A value computed on first use and kept (the real images in pixels: decoded once, if at all)."""

    def __init__(self, make):
        self.make, self.value, self.done = make, None, False

    def __call__(self):
        if not self.done:
            self.value, self.done = self.make(), True
        return self.value


def disc_conditioning(disc, batch: Batch, cond: Conditioning, real_pixels) -> Conditioning:
    """D's condition for a batch: its own when it has one (the VFM's text and reference image), else
    the networks' conditioning."""
    own = getattr(disc, "conditioning", None)
    return cond if own is None else own(batch.prompts, cond, real_pixels)


def is_generator_turn(n: int, ratio: int, turn: str) -> bool:
    """Whether 0-based iteration ``n`` updates the generator under TTUR with period ``ratio``."""
    return (n + 1) % ratio == 0 if turn == "period_end" else n % ratio == 0


class Distiller:
    def __init__(self, cfg: DistillConfig, progress: bool = True):
        check_supported(cfg)
        check_buildable(cfg)
        self.cfg = cfg
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.progress = progress and self.rank == 0
        self.run_dir = Path(cfg.output_dir)
        prec = cfg.precision
        self.device = resolve_device(cfg.parallel.device)
        self.autocast_dtype = to_dtype(prec.autocast_dtype, "precision.autocast_dtype")
        set_tf32(prec.tf32)
        self.adapter = build_adapter(cfg).to(self.device)  # a missing teacher is the first error
        check_optimizers(cfg, self.device)  # before any network is built
        self.param = self.adapter.param
        self.mesh = device_mesh(self.device, cfg.parallel.strategy, cfg.parallel.replicate_degree)
        nets = self._build_networks()
        self.teacher, self.generator, self.fake_score = nets["teacher"], nets["generator"], nets["fake_score"]
        self.ida = self._ida() if cfg.method.ida.enabled else None
        torch.manual_seed(cfg.seed)  # new parameters (discriminator heads) start alike on every rank and run
        self.discriminator = build_discriminator(cfg.method.gan, self.adapter, self.fake_score)
        strategy = cfg.parallel.strategy
        # FSDP2 shards in place (the *_ddp names then hold the modules themselves); DDP wraps.
        unused = self.adapter.has_unused_parameters
        self.generator_ddp = wrap(self.generator, "generator", strategy, unused)
        self.fake_ddp = wrap(self.fake_score, "fake_score", strategy, unused)
        o = cfg.optim
        self.optimizers = {
            "generator": build_optimizer(self.generator.parameters(), o.generator),
            "fake_score": build_optimizer(self.fake_score.parameters(), o.fake),
        }
        self.clips = {"generator": o.generator.clip_grad, "fake_score": o.fake.clip_grad}
        self.disc_ddp = None
        if self.discriminator is not None:
            self.discriminator.to(self.device)
            self.disc_ddp = wrap(self.discriminator, "discriminator", strategy)
            self.optimizers["discriminator"] = build_optimizer(
                self.discriminator.trainable_parameters(), o.discriminator
            )
            self.clips["discriminator"] = o.discriminator.clip_grad
        self.schedulers = build_schedulers(self.optimizers, o)
        self.full_state: set[str] = set()  # optimisers whose every parameter has a state
        self.anchor_levels = self.param.anchor_levels(self.adapter.anchors).to(self.device)
        self.step = SenseFlowStep(
            cfg.method, self.param, self.anchor_levels, self.network_calls(), self.discriminator
        )
        self.batch = cfg.data.batch_size
        stream = build_stream(cfg, self.rank, self.world)
        verify_latent_cache(stream, self.adapter)  # a latent cache must come from this teacher's VAE
        self.data_identity = stream_identity(stream)
        self.data = BatchLoader(stream, cfg.data.num_workers, cfg.schedule.iterations)
        self.guard = NonFiniteGuard(cfg.health.nan_patience)
        self.last_losses: dict[str, float] = {}  # the newest value of each loss (progress bar)
        self.last_logs: dict[str, float] = {}
        self.iteration = 0
        self.checkpointer: ShardedCheckpointer | None = None

    @property
    def levels(self) -> Tensor:
        """a_0 .. a_{K-1} and the end of the last segment (the step's)."""
        return self.step.levels

    def _ida(self):
        """IDA as one call after each generator update: between whole networks (their local shards
        under FSDP2), or between the two adapters of LoRA mode."""
        ida = self.cfg.method.ida
        if self.cfg.model.lora is not None:
            return LoraIda(self.generator, self.fake_score, self.cfg.model.lora.ida, ida.lam)
        check_ida_compatible(self.fake_score, self.generator)

        def update() -> dict[str, float]:
            reshard(self.fake_score, self.generator)  # IDA pairs the local shards
            ida_update_(self.fake_score, self.generator, ida.lam, ida.update_dtype)
            return {}

        return update

    def _build_networks(self) -> dict[str, torch.nn.Module]:
        """Build on meta, shard, then load: each rank reads from the teacher's files only what its
        own (whole or sharded) networks hold, once for all three roles (``parallel.load: rank0``:
        rank 0 reads and scatters)."""
        prec, par = self.cfg.precision, self.cfg.parallel
        teacher_dtype = to_dtype(prec.teacher_dtype, "precision.teacher_dtype")
        train_dtype = to_dtype(prec.param_dtype, "precision.param_dtype")

        def prepare(net, role):
            storage = teacher_dtype if role == "teacher" else train_dtype
            policy = shard_policy(role, storage, prec, par)
            checkpointing = par.gradient_checkpointing
            return shard(net, role, par.strategy, self.adapter, self.mesh, checkpointing, policy, par.compile)

        if self.cfg.model.lora is not None:  # one base, two adapters (in the masters' dtype)
            lora_prepare = lambda net, role: shard(  # noqa: E731
                net, role, par.strategy, self.adapter, self.mesh, False, None, par.compile
            )
            return build_lora_roles(
                self.adapter, self.cfg, teacher_dtype, train_dtype, self.device, lora_prepare
            )
        sharded = is_sharded("generator", par.strategy)
        return build_roles(
            self.adapter,
            NETWORK_ROLES,
            teacher_dtype,
            train_dtype,
            self.device,
            prepare=prepare,
            broadcast=sharded and par.load == "rank0",
        )

    # ------------------------------------------------------------------ networks as the step calls them

    def predict(self, net, x: Tensor, level: Tensor, cond: Conditioning) -> Tensor:
        """A network's raw output in float32, computed under the recipe's autocast."""
        with autocast(self.device, self.autocast_dtype):
            return self.adapter.forward(net, x, level, cond)

    def guided(self, x: Tensor, level: Tensor, cond: Conditioning, guidance: Tensor) -> Tensor:
        with autocast(self.device, self.autocast_dtype):
            return self.adapter.guided_predict(self.teacher, x, level, cond, guidance)

    def decode(self, x: Tensor) -> Tensor:
        with autocast(self.device, self.autocast_dtype):
            return self.adapter.decode(x).float()

    def network_calls(self) -> NetworkCalls:
        def call(net):
            return lambda x, level, cond: self.predict(net, x, level, cond)

        def disc_call(module):
            def fn(*args, **kwargs):
                with autocast(self.device, self.autocast_dtype):
                    return module(*args, **kwargs).float()

            return fn

        disc = self.discriminator
        return NetworkCalls(
            generator=call(self.generator),
            generator_train=call(self.generator_ddp),
            fake_score=call(self.fake_score),
            fake_score_train=call(self.fake_ddp),
            teacher=self.guided,
            decode=self.decode,
            discriminator=None if disc is None else disc_call(disc),
            discriminator_train=None if disc is None else disc_call(self.disc_ddp),
        )

    # ------------------------------------------------------------------ one iteration

    def _non_finite(self, losses: dict[str, Tensor]) -> list[str]:
        """Non-finite losses on this rank, or a marker when only another rank has one: every rank
        must skip the same updates, or their collectives would no longer pair up."""
        bad = non_finite(losses)
        if dist.is_initialized():
            flag = torch.tensor([float(bool(bad))], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and not bad:
                bad = ["another rank's " + "/".join(losses)]
        return bad

    def update(self, name: str, loss: Tensor) -> None:
        """Backward of ``loss``, then the clip and step of network ``name``'s optimiser."""
        self.joint_update((name,), loss)

    def inputs(self, batch: Batch) -> tuple[Tensor, Conditioning]:
        """The batch's real samples in the model space (cached latents when it has them) and its
        conditioning (cached encodings when it has them)."""
        with autocast(self.device, self.autocast_dtype), torch.no_grad():
            x_real = self.adapter.model_inputs(batch)
        if x_real is None:
            # A prompts-only batch: the schema allows it only when every generator input is simulated
            # and no discriminator reads real samples, so these zeros give only the sample shape.
            shape = self.adapter.sample_shape(self.cfg.data.resolution)
            x_real = torch.zeros(len(batch), *shape, device=self.device)
        return x_real.float(), self.adapter.conditioning(batch)

    def draws(self, n: int, sample_shape: tuple[int, ...]):
        """Iteration ``n``'s draws for the global batch, and this rank's slice of them."""
        cfg, disc = self.cfg, self.discriminator
        everyone = draw_step(
            cfg.method,
            self.param,
            self.anchor_levels,
            sample_shape,
            self.batch * self.world,
            self.batch,
            cfg.seed,
            n,
            disc_shape=self._disc_shape(sample_shape),
            disc_noised=disc is not None and disc.noised,
        )
        lo = self.rank * self.batch
        return everyone, everyone.slice(lo, lo + self.batch).to(self.device)

    def _logging_iteration(self, n: int) -> bool:
        return n % self.cfg.logging.every == 0 or n + 1 == self.cfg.schedule.iterations

    def train_step(self) -> dict[str, float]:
        """One iteration (spec §2); returns its logged scalars."""
        cfg, n, step = self.cfg, self.iteration, self.step
        batch = self.data.batch(n).to(self.device)
        x_real, cond = self.inputs(batch)
        everyone, d = self.draws(n, tuple(x_real.shape[1:]))
        x_in = step.generator_input(x_real, d, cond, rollout_steps=everyone.rollout_steps())
        level_j = self.levels[d.anchor_index]
        generator_turn = is_generator_turn(n, cfg.method.ttur_ratio, cfg.method.ttur_generator_turn)
        out_in, x0 = step.generator_output(x_in, level_j, cond, train=generator_turn)
        logs: dict[str, float] = {"iteration": n, "generator_turn": float(generator_turn)}
        losses: dict[str, Tensor] = {}
        disc = self.discriminator
        real_pixels = _Once(lambda: self._real_pixels(batch, x_real))
        disc_cond = cond if disc is None else disc_conditioning(disc, batch, cond, real_pixels)
        leak = disc is not None and cfg.method.gan.official_grad_leak and generator_turn
        if generator_turn:
            total, more = step.generator_loss(x_in, out_in, x0, d, cond, disc_cond)
            logs.update(more)
            losses["generator"] = total
            if leak:  # D's heads collect the generator's adversarial gradient for D's own update
                self.optimizers["discriminator"].zero_grad(set_to_none=True)
            if not self._non_finite({"generator": total}):
                self.update("generator", total)
                if self.ida is not None:
                    logs.update(self.ida())
        x0 = x0.detach()
        fake = step.fake_loss(x0, d, cond)
        losses["fake_score"] = fake
        logs["loss_fake"] = fake.item()
        pixels = disc is not None and disc.input_space == "pixels"
        # Decoding (a VAE pass for latent teachers) only for a pixel-space D or for the image statistics
        # of a logged iteration (which rank 0 alone writes).
        stats = self.rank == 0 and self._logging_iteration(n)
        decoded = self.decode(x0) if pixels or stats else None
        fake_alone = disc is None or not disc.shares_fake_update
        if fake_alone and not self._non_finite({"fake": fake}):
            self.update("fake_score", fake)
        if disc is not None:
            real_d, fake_d = (real_pixels(), decoded) if pixels else (x_real, x0)
            with disc.fake_in_graph() if disc.shares_fake_update else nullcontext():
                d_loss, more = step.discriminator_loss(real_d, fake_d, disc_cond, level_j, d)
            losses["discriminator"] = d_loss
            if disc.shares_fake_update:  # D's loss also trains the fake score: one backward, two steps
                if not self._non_finite({"fake": fake, "d": d_loss}):
                    self.joint_update(("fake_score", "discriminator"), fake + d_loss)
            elif not self._non_finite({"d": d_loss}):
                self.joint_update(("discriminator",), d_loss, keep_grads=leak)
            logs.update(more)
        if stats:
            logs.update(image_stats(decoded, cfg.health))
        self.guard.end_iteration(self._non_finite(losses), n)
        self.last_losses.update({k: v for k, v in logs.items() if k.startswith("loss_")})
        step_schedulers(self.schedulers)  # every iteration, as the official trainers
        self.iteration += 1
        return logs

    def _real_pixels(self, batch: Batch, x_real: Tensor) -> Tensor:
        """Real images for a pixel-space D: the batch's own, or its latents decoded."""
        if batch.images is not None and self.cfg.method.gan.real_pixels == "images":
            return batch.images
        with torch.no_grad():
            return self.decode(x_real)

    def _disc_shape(self, sample_shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """Shape of one discriminator input (decoded RGB or model space), for its draws."""
        if self.discriminator is None:
            return None
        if self.discriminator.input_space == "pixels":
            return (3, self.cfg.data.resolution, self.cfg.data.resolution)
        return sample_shape

    def joint_update(self, names: tuple[str, ...], loss: Tensor, keep_grads: bool = False) -> None:
        """One backward of a loss shared by several networks, then each optimiser's clip and step
        (``keep_grads``: add to the gradients already there, for ``gan.official_grad_leak``)."""
        for name in names:
            if not keep_grads:
                self.optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        for name in names:
            optimizer = self.optimizers[name]
            if name not in self.full_state:  # an optimiser's first update only
                zero_missing_grads(optimizer)
                self.full_state.add(name)
            if self.clips[name] is not None:
                params = [p for group in optimizer.param_groups for p in group["params"]]
                torch.nn.utils.clip_grad_norm_(params, self.clips[name])
            optimizer.step()

    # ------------------------------------------------------------------ state, checkpoints, loop

    def modules(self) -> dict[str, torch.nn.Module]:
        mods = {"generator": self.generator, "fake_score": self.fake_score}
        if self.discriminator is not None:
            mods["discriminator"] = self.discriminator
        return mods

    def training_state(self) -> dict:
        """Everything but the weights and optimiser states."""
        return {
            "iteration": self.iteration,
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "guard": self.guard.state_dict(),
            "world_size": self.world,
            "data_stream": self.data_identity,
        }

    def save(self) -> Path | None:
        """Write a checkpoint (every rank calls it): sharded with DCP, or gathered whole and written
        by rank 0 (``checkpoint.format``)."""
        c = self.cfg.checkpoint
        modules = self.modules()
        if c.format == "dcp":
            if self.checkpointer is None:
                self.checkpointer = ShardedCheckpointer(
                    self.run_dir / "checkpoints", c.keep_last, c.async_save, c.verify == "sha256"
                )
            return self.checkpointer.save(
                self.iteration, modules, self.optimizers, self.training_state(), dump_config(self.cfg)
            )
        weights = {k: ckpt.gather_weights(m) for k, m in modules.items()}
        optimizers = {k: ckpt.gather_optimizer(modules[k], o) for k, o in self.optimizers.items()}
        path, error = None, None
        if self.rank == 0:
            try:
                path = ckpt.save_checkpoint(
                    self.run_dir / "checkpoints",
                    self.iteration,
                    weights,
                    {**self.training_state(), "optimizers": optimizers},
                    dump_config(self.cfg),
                    c.keep_last,
                    hashes=c.verify == "sha256",
                )
            except CheckpointWriteError as exc:
                error = exc
        agree(error, f"checkpoint of iteration {self.iteration}")
        return path

    def finish_saving(self) -> None:
        """Wait for an asynchronous checkpoint write still in flight (every rank)."""
        if self.checkpointer is not None:
            self.checkpointer.wait()
            if dist.is_initialized():
                dist.barrier()

    def resume(self, path: Path) -> None:
        """Continue from a checkpoint of either format, saved at any world size and strategy."""
        modules = self.modules()
        error = None
        if self.rank == 0:  # one rank reads the whole checkpoint to check it, then tells the others
            try:
                ckpt.verify_checkpoint(path)
            except CheckpointError as exc:
                error = exc
        agree(error, f"checkpoint {path}")
        if ckpt.read_meta(path)["format"] == "dcp":
            state = ckpt.load_state(path)
            load_sharded(path, modules, self.optimizers, verify=False)
        else:
            state = ckpt.load_checkpoint(path, modules, verify=False)
            for k, opt in self.optimizers.items():
                ckpt.load_optimizer(modules[k], opt, state["optimizers"][k])
        check_data_stream(path, state.get("data_stream"), self.data_identity)
        for k, sched in self.schedulers.items():
            sched.load_state_dict(state["schedulers"][k])
        self.guard.load_state_dict(state["guard"])
        self.iteration = state["iteration"]

    def run(self) -> dict[str, float]:
        """Train to ``schedule.iterations``, logging, sampling and checkpointing on the way; on
        SIGTERM/SIGINT finish the iteration, write a checkpoint and raise :class:`Preempted`."""
        cfg = self.cfg
        resume_run(self, self.run_dir / "checkpoints", cfg.checkpoint.resume)
        if self.rank == 0:
            save_resolved(cfg, self.run_dir / "config.yaml")
        log = Logbook(self.run_dir, cfg.logging.tensorboard, self.iteration) if self.rank == 0 else None
        total = cfg.schedule.iterations
        bar = tqdm(total=total, initial=self.iteration, desc="distill", disable=not self.progress)
        start = time.perf_counter()
        try:
            with StopOnSignal(self.device) as stop:
                self._loop(total, log, bar, start, stop)
            self.finish_saving()
        finally:
            self.data.close()
            bar.close()
            if log is not None:
                log.close()
        return self.last_logs

    def _loop(self, total: int, log: Logbook | None, bar, start: float, stop: StopOnSignal) -> None:
        cfg = self.cfg
        while self.iteration < total:
            logs = self.last_logs = self.train_step()
            n = self.iteration
            alarm = collapse_alarm(logs, cfg.health)  # on logged iterations, which carry the statistics
            if log is not None and (logs["iteration"] % cfg.logging.every == 0 or n == total):
                logs["seconds"] = round(time.perf_counter() - start, 3)
                logs["alarm"] = alarm
                log.write(logs, step=int(logs["iteration"]))
            if alarm and self.progress:
                tqdm.write(f"iteration {n}: {alarm}")
            if cfg.logging.sample_every and n % cfg.logging.sample_every == 0:  # every rank: FSDP2 gathers
                path = self.run_dir / "samples" / f"step-{n:08d}.png"
                save_sample_grid(
                    self.adapter, self.generator, self.anchor_levels, cfg, path, write=self.rank == 0
                )
            saved = n % cfg.checkpoint.every == 0 or n == total
            if saved:
                self.save()
            if n < total and stop.requested():
                if not saved:
                    self.save()
                self.finish_saving()
                raise Preempted(
                    f"stopped by {stop.name} after iteration {n} ({self.run_dir}): a checkpoint of it is "
                    "written; continue with `senseflow train ... --resume`"
                )
            bar.update(1)
            bar.set_postfix(
                {k.removeprefix("loss_"): f"{v:.3g}" for k, v in self.last_losses.items()}, refresh=False
            )
