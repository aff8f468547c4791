"""One worker's training: model, data, DeepSpeed engine, the step loop and evaluation."""

from __future__ import annotations

import contextlib
import itertools
import random
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from addertrain import distill, distributed
from addertrain import engine as ds_engine
from addertrain.alr import AdderSGD, param_groups
from addertrain.checkpoint import Checkpointer, RNGState, read_meta
from addertrain.config import Config
from addertrain.console import LOG
from addertrain.data import build_loader
from addertrain.errors import UserError
from addertrain.evaluate import eval_summary, eval_sums
from addertrain.metrics import MetricsLog, Progress, eval_line, plot
from addertrain.model_io import create_model_from_config, write_model
from addertrain.nn import average_running_stats, reestimated
from addertrain.phases import Phases
from addertrain.schedule import build_schedule
from addertrain.watchdog import Watchdog

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Trainer:
    def __init__(self, cfg: Config, world: distributed.WorldInfo, phases: Phases | None = None):
        self.cfg, self.world = cfg, world
        self.phases = phases or Phases()
        started = time.time()
        self.run_dir = cfg.run_dir()
        cfg.check_device(world.device.type)
        micro, self.accum = cfg.batch_split(world.world_size)
        seed_everything(cfg.run.seed, cfg.run.deterministic)

        self.train_data = build_loader(
            cfg, "train", micro, world.rank, world.world_size, world.device, index_dir=self.run_dir
        )
        self.val_data = build_loader(
            cfg, "val", micro, world.rank, world.world_size, world.device, index_dir=self.run_dir
        )
        # Its own loader, so that re-estimating BatchNorm never moves the training data.
        self.recal_data = (
            build_loader(
                cfg, "train", micro, world.rank, world.world_size, world.device, self.run_dir
            )
            if cfg.eval.bn_recalibration_batches
            else None
        )
        started = self.phases.since("data_pipelines", started)
        self.eval_norm_stats: dict = {}  # the statistics the last evaluation used, if its own
        self.steps_per_epoch = self.train_data.steps_per_epoch // self.accum
        if self.steps_per_epoch == 0:
            raise UserError(
                "an epoch of the training data is shorter than one global batch; "
                "lower train.global_batch or use more data"
            )
        self.total_steps = cfg.train.max_steps or max(
            1, round(cfg.schedule.epochs * self.steps_per_epoch)
        )
        self.eval_every = (
            round(cfg.train.eval_interval * self.steps_per_epoch) if cfg.train.eval_interval else 0
        )

        self.dtype = DTYPES[cfg.train.precision]
        # fp32 here: DeepSpeed casts the parameters to a half precision and leaves the
        # buffers, so BatchNorm's running statistics stay fp32 (addertrain/nn/norm.py).
        a = cfg.adder
        model = create_model_from_config(cfg).to(world.device)
        o = cfg.optim
        self.optimizer = AdderSGD(
            param_groups(model, o.weight_decay),
            lr=o.lr,
            momentum=o.momentum,
            nesterov=o.nesterov,
            eta=a.eta,
            mode=a.lr,
            increase=a.lr_increase,
            clip=o.grad_clip,
        )
        self.lr_at = build_schedule(cfg.schedule, self.total_steps, self.steps_per_epoch, o.lr)
        self.engine = ds_engine.initialize(cfg, model, self.optimizer, world.world_size)
        self.phases.since("engine", started)
        self.teacher = distill.Teacher(cfg, world.device) if cfg.distill.teacher else None
        self._teacher_since = (0, 0.0)  # (step, teacher seconds) at the last log line
        self.step = 0
        self.images_seen = 0
        self._first_bad = torch.zeros((), dtype=torch.long, device=world.device)
        self.last_eval: dict = {}
        self.log = MetricsLog(self.run_dir, world.is_main, cfg.logging.tensorboard)
        self.progress = Progress(self.total_steps, world.is_main and cfg.logging.progress)
        # Everything a continuation needs besides the engine (model, optimizer, schedule).
        self.checkpointer = Checkpointer(
            cfg,
            world,
            self.engine,
            {"progress": self, "rng": RNGState(), "train_data": self.train_data},
        )

    # -- the step -------------------------------------------------------------
    def train_step(self, micro_batches) -> tuple[torch.Tensor, float]:
        """One optimizer step over ``accum`` micro-batches; returns (the global mean loss, on
        the device, and the learning rate the step used)."""
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=self.world.device)
        for images, labels, _ in micro_batches:
            logits = self.engine(images.to(self.dtype))
            loss = self.loss(logits.float(), images, labels)
            self.engine.backward(loss)
            self.engine.step()
            total += loss.detach()
        total /= self.accum
        if self.world.world_size > 1:
            dist.all_reduce(total)
            total /= self.world.world_size
            # Every rank holds the same model after every step, BatchNorm statistics included:
            # what is evaluated, checkpointed, exported and resumed is one model.
            average_running_stats(self.engine.module)
        return total, lr

    def loss(self, logits: torch.Tensor, images: torch.Tensor, labels: torch.Tensor):
        smoothing = self.cfg.optim.label_smoothing
        if self.teacher is None:
            return F.cross_entropy(logits, labels, label_smoothing=smoothing)
        d = self.cfg.distill
        return distill.loss(logits, self.teacher(images), labels, d.temperature, d.alpha, smoothing)

    # -- evaluation -----------------------------------------------------------
    def evaluate(self) -> dict:
        with self._norm_stats() as self.eval_norm_stats:
            self.engine.eval()
            sums = eval_sums(self.engine, self.val_data, self.dtype, self.world.device)
            self.engine.train()
        if self.world.world_size > 1:
            dist.all_reduce(sums)
        result = eval_summary(sums, self.cfg.model.num_classes)
        if self.recal_data is not None:
            result["bn_recalibration_batches"] = self.cfg.eval.bn_recalibration_batches
        return result

    def _norm_stats(self):
        """The BatchNorm statistics to evaluate with: the running ones, or (with
        eval.bn_recalibration_batches) ones re-estimated for this evaluation alone."""
        if self.recal_data is None:
            return contextlib.nullcontext({})
        # An epoch of its own per step: the batches depend on the step alone, so a resumed run
        # re-estimates as the uninterrupted one did (steps only grow, so set_epoch restarts).
        self.recal_data.set_epoch(self.step)
        n = min(self.cfg.eval.bn_recalibration_batches, self.recal_data.steps_per_epoch)
        images = (x.to(self.dtype) for x, _, _ in itertools.islice(self.recal_data, n))
        return reestimated(self.engine.module, images)

    # -- state (one part of every checkpoint) ---------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "images_seen": self.images_seen, "eval": self.last_eval}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.images_seen, self.last_eval = (
            state["step"],
            state["images_seen"],
            state["eval"],
        )

    def resume(self, path: Path) -> None:
        # On another number of workers (replicated state, checkpoint.check_world) the saved
        # data positions are of another layout; the order puts each optimizer step's samples
        # at the same place for any split of the global batch (data/sharding.py), so the
        # position follows from the step alone.
        resized = read_meta(path)["world_size"] != self.world.world_size
        self.checkpointer.load(path, skip=("train_data",) if resized else ())
        epoch, into = divmod(self.step, self.steps_per_epoch)
        if resized:
            self.train_data.seek(epoch, into * self.accum)
        if into == 0:  # the checkpoint ended an epoch (the loader may hold a ragged tail of it)
            self.train_data.set_epoch(epoch)
        self._teacher_since = (self.step, 0.0)
        if self.world.is_main:
            self.log.forget_after(self.step)
            LOG.info(f"resumed from {path} at step {self.step}/{self.total_steps}")
        self.progress.mark(self.step, self.images_seen)

    # -- the loop -------------------------------------------------------------
    def _batches(self):
        """Micro-batches grouped per optimizer step, across epochs, from the current step on."""
        while True:
            it = iter(self.train_data)
            for _ in range(self.steps_per_epoch - self.step % self.steps_per_epoch):
                yield [next(it) for _ in range(self.accum)]
            self.train_data.set_epoch(self.step // self.steps_per_epoch)

    def fit(self) -> dict:
        """Train to the end, or until a preemption request; checkpoints on the way. A step
        (or evaluation, checkpoint) that never ends ends the process (addertrain/watchdog.py)."""
        d = self.cfg.distributed
        with Watchdog(
            self.run_dir, self.world.rank, d.step_timeout_s, announce=d.executor == "local"
        ) as dog:
            return self._fit(dog)

    def _fit(self, dog: Watchdog) -> dict:
        batches = self._batches()
        phase = "first_step"  # of this process: it pays for what the libraries set up lazily
        while self.step < self.total_steps:
            with self.phases.timed(phase):
                loss, lr = self.train_step(next(batches))
            phase = "training"
            self.step += 1
            dog.beat(self.step)
            self.images_seen += self.cfg.train.global_batch
            # The first step with a non-finite loss, noted on the device: reading the loss
            # every step would make the host wait for the GPU at every step.
            self._first_bad.copy_(
                torch.where((self._first_bad == 0) & ~loss.isfinite(), self.step, self._first_bad)
            )
            final = self.step == self.total_steps
            if self.step % self.cfg.logging.interval_steps == 0 or final:
                self._check_finite()
                self._log_train(loss.item(), lr)
            evaluated = final or bool(self.eval_every and self.step % self.eval_every == 0)
            if evaluated:
                with dog.long("evaluation"), self.phases.timed("evaluation"):
                    self._evaluate_and_log()
            due, stop = self.checkpointer.poll(self.step)
            if (
                due
                or final
                or (evaluated and self.checkpointer.wants_save_after_eval(self.last_eval["top1"]))
            ):
                self._check_finite()  # never checkpoint a diverged model
                with dog.long("checkpoint"), self.phases.timed("checkpoint"):
                    self.checkpointer.save(self.step, self.last_eval["top1"] if evaluated else None)
            if stop and not final:
                return self._summary("preempted")
        return self._summary("completed")

    def _check_finite(self) -> None:
        bad = int(self._first_bad)
        if bad:
            raise FloatingPointError(
                f"the training loss became non-finite at step {bad}; the last "
                "checkpoint is before it: lower optim.lr or set optim.grad_clip"
            )

    def _log_train(self, loss: float, lr: float) -> None:
        rate = self.progress.update(self.step, self.images_seen, loss=loss, lr=lr)
        # skipped: fp16 steps DeepSpeed dropped after an overflow; they count as steps (their
        # data was consumed and the schedule moved on) but changed no weight
        self.log.write(
            "train",
            step=self.step,
            epoch=self.step / self.steps_per_epoch,
            loss=loss,
            lr=lr,
            img_per_s=rate,
            images_seen=self.images_seen,
            skipped_steps=self.engine.skipped_steps,
            alr=self.optimizer.summary(),
            alr_layers=self._layer_stats(),
            **self._teacher_cost(),
        )

    def _teacher_cost(self) -> dict:
        """The teacher's forward time per step since the last log line (distillation only)."""
        if self.teacher is None:
            return {}
        step, seconds = self._teacher_since
        self._teacher_since = (self.step, self.teacher.seconds)
        return {"teacher_ms": 1e3 * (self.teacher.seconds - seconds) / max(1, self.step - step)}

    def _layer_stats(self) -> dict:
        """Per adder layer: its latest ALR scale and the gradient norm that scale implies
        (``eta * sqrt(k) / scale``; 0 for a zero gradient, whose scale is 1)."""
        numel = {g["name"]: g["alr_numel"] for g in self.optimizer.param_groups if g["alr_numel"]}
        eta = self.cfg.adder.eta
        return {
            name: {"scale": a, "grad_norm": eta * numel[name] ** 0.5 / a if a != 1.0 else 0.0}
            for name, a in self.optimizer.last_scales.items()
        }

    def _evaluate_and_log(self) -> None:
        self.last_eval = result = self.evaluate()
        self.log.write("eval", step=self.step, epoch=self.step / self.steps_per_epoch, **result)
        if self.world.is_main:
            LOG.info(f"eval at step {self.step}: {eval_line(result)}")
        self.progress.mark(self.step, self.images_seen)

    def _summary(self, status: str) -> dict:
        self.log.close()
        return {
            "status": status,
            "steps": self.step,
            "images_seen": self.images_seen,
            "skipped_steps": self.engine.skipped_steps,
            "eval": self.last_eval,
            "checkpoint_seconds": round(self.checkpointer.seconds, 3),
            "peak_memory_bytes": peak_memory_bytes(self.world.device),
        }

    def save_final(self) -> Path | None:
        """The trained model alone (safetensors) and its config, for eval or fine-tuning: the
        model the final evaluation measured, with its re-estimated BatchNorm statistics if any."""
        stats = self.eval_norm_stats
        if self.recal_data is not None and not stats:  # resumed after the final checkpoint
            with self._norm_stats() as stats:
                pass
        if not self.world.is_main:
            return None
        out = write_model(
            {**self.engine.module.state_dict(), **stats}, self.cfg.to_dict(), self.run_dir / "final"
        )
        if self.cfg.logging.plots:
            plot(self.log.read(), self.run_dir / "metrics.png")
        return out
