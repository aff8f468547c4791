"""The recipe: a typed config tree loaded from YAML, with ``key.path=value`` overrides.

Every problem becomes one :class:`UserError` naming the key path and what is allowed.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from addertrain.errors import UserError


class Section(BaseModel):
    # strict: `true` is not 1 and 2.0 is not 2 (an int still fills a float key); the tuple keys
    # relax it, since YAML gives them as lists. No key has a use for inf or nan.
    model_config = ConfigDict(
        extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False
    )


class RunConfig(Section):
    name: str = "run"
    dir: str = "runs"
    # what numpy's and torch's generators accept
    seed: int = Field(0, ge=0, lt=2**32)
    deterministic: bool = False
    # which dataset files launch opens before the workers start, to find empty, missing and
    # non-image files: "full" all, "sample" an even 10,000, for file systems where opening a
    # million files is slow (docs/data.md). Here, not under data: a resume may change it.
    # Folders only: packed data (data.source: packed) is checked from its manifest.
    data_check: Literal["full", "sample"] = "full"


# The architectures and adder backends a recipe may name: models/ and nn/ take them from here.
ARCHS = ("resnet20", "resnet32", "resnet18", "resnet50", "lenet5")
BACKENDS = ("auto", "reference", "triton")


class ModelConfig(Section):
    arch: Literal[ARCHS] = "resnet20"
    conv: Literal["adder", "conv"] = "adder"
    num_classes: int = Field(10, ge=2)
    # auto: BN on the logits (the paper's head) for adder, the standard linear head for conv
    head: Literal["auto", "bn", "linear"] = "auto"
    backend: Literal[BACKENDS] = "auto"
    bn_momentum: float = Field(0.1, gt=0, le=1)


class SyntheticConfig(Section):
    train_size: int = Field(2048, ge=1)
    val_size: int = Field(512, ge=1)


class DataConfig(Section):
    # folder: ImageNet layout root/{train,val}/<class>/*.JPEG; synthetic: generated;
    # cifar: root holds the python batches (cifar-10-batches-py/ or cifar-100-python/);
    # mnist: root holds the IDX files (train-images-idx3-ubyte[.gz], ...);
    # packed: root holds the shards `addertrain data pack` wrote (manifest.json, *.tar)
    source: Literal["folder", "synthetic", "cifar", "mnist", "packed"] = "synthetic"
    root: str | None = None
    train_split: str = "train"
    val_split: str = "val"
    # prepare a missing dataset with a builder (e.g. "digits") before training
    prepare: Literal["digits", "mnist5k"] | None = None
    image_size: int = Field(32, ge=8)
    # evaluation: resize the shorter side to this, then center-crop image_size
    eval_resize: int | None = None
    channels: int = Field(3, ge=1)
    crop_scale: tuple[float, float] = Field((0.08, 1.0), strict=False)
    crop_ratio: tuple[float, float] = Field((3 / 4, 4 / 3), strict=False)
    random_resized_crop: bool = True
    # training without random_resized_crop: zero-pad this many pixels per side, then crop
    # image_size at a random position (CIFAR's RandomCrop(32, padding=4)); cifar and mnist
    # never use random_resized_crop
    pad_crop: int = Field(0, ge=0)
    flip: bool = True
    mean: tuple[float, float, float] = Field((0.485, 0.456, 0.406), strict=False)
    std: tuple[float, float, float] = Field((0.229, 0.224, 0.225), strict=False)
    # DALI's CPU threads per worker; packed data also reads its shards with this many threads
    threads: int = Field(2, ge=1)
    synthetic: SyntheticConfig = SyntheticConfig()

    @model_validator(mode="after")
    def _check(self):
        if self.source != "synthetic" and not self.root:
            raise ValueError(
                f"data.root must name the dataset folder when data.source is {self.source}"
            )
        if self.source in ("cifar", "mnist", "packed") and self.prepare:
            raise ValueError(
                f"data.prepare builds a folder dataset; drop it with data.source={self.source}"
            )
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError("data.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise ValueError("data.crop_ratio must be [lo, hi] with 0 < lo <= hi")
        if self.eval_resize is not None and self.eval_resize < self.image_size:
            raise ValueError("data.eval_resize must be at least data.image_size")
        return self


class OptimConfig(Section):
    name: Literal["sgd"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(1e-4, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0)


class ScheduleConfig(Section):
    epochs: float = Field(1, gt=0)
    kind: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = Field(0, ge=0)
    min_lr: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _check(self):
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ValueError("schedule.warmup_epochs must be shorter than schedule.epochs")
        return self


# The adder layers' rules a recipe may name (nn/adder.py and alr.py take them from here);
# the first of each is the paper's method, the others its ablations.
WEIGHT_GRADS = ("full", "sign")
INPUT_GRADS = ("hardtanh", "full", "sign")
LR_MODES = ("alr", "fixed", "increased")


class AdderConfig(Section):
    """The adder layers' training rules; the defaults are the paper's method, the other
    values its ablations (docs/fidelity.md). ``lr``: ``alr`` the adaptive learning rate,
    ``fixed`` the plain schedule, ``increased`` the schedule times ``lr_increase`` for every
    adder layer alike. ``grad``: the weight gradient, full precision ``X - W`` or its sign
    (the exact derivative of ``-|X - W|``). ``input_grad``: ``hardtanh`` ``HT(W - X)``,
    ``full`` ``W - X`` unclipped, or ``sign``."""

    lr: Literal[LR_MODES] = "alr"
    eta: float = Field(0.2, gt=0)
    # one factor for all adder layers: the median ALR scale of the digits recipe (3,200 over
    # its 20 adder layers at 18 logged steps, from 140 to 1e5; docs/fidelity.md), rounded
    lr_increase: float = Field(3000.0, gt=0)
    grad: Literal[WEIGHT_GRADS] = "full"
    input_grad: Literal[INPUT_GRADS] = "hardtanh"

    @model_validator(mode="before")
    @classmethod
    def _legacy_alr(cls, data):
        """``alr: true|false``, the older spelling (recipes and saved runs), means ``lr: alr``
        or ``fixed``; an ``lr`` given too decides, so ``adder.lr=...`` overrides such a recipe."""
        if isinstance(data, dict) and "alr" in data:
            data = dict(data)
            alr = data.pop("alr")
            if not isinstance(alr, bool):
                raise ValueError(
                    f"adder.alr must be true or false (got {alr!r}); "
                    "better: adder.lr=alr|fixed|increased"
                )
            data.setdefault("lr", "alr" if alr else "fixed")
        return data


class TrainConfig(Section):
    global_batch: int = Field(256, ge=1)
    micro_batch: int = Field(64, ge=1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # evaluate every this many epochs (and always at the end); 0 = only at the end
    eval_interval: float = Field(1, ge=0)
    # stop after this many optimizer steps (None: run the schedule's epochs)
    max_steps: int | None = Field(None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class DistributedConfig(Section):
    executor: Literal["ray", "local"] = "ray"
    workers: int = Field(1, ge=1)
    gpus_per_worker: float = Field(0, ge=0)
    cpus_per_worker: float = Field(1, gt=0)
    zero_stage: Literal[0, 1, 2] = 0
    ray_address: str | None = None
    # Worker-group restarts after a failure; none: 3 on a cluster (--address, Slurm), 0 on the
    # embedded one (docs/multinode.md, "Node loss")
    max_failures: int | None = Field(None, ge=0)
    # how long a restart (or the first start) waits for its workers to be placed
    replacement_timeout_s: float = Field(300, gt=0)
    # hung-peer bound: collectives and Ray's worker health check time out after it, and the
    # step watchdog fires after min(it, max(60 s, 10 x the slowest recent step))
    step_timeout_s: float = Field(300, gt=0)
    # Train on as few as min_workers when the others are lost (or missing at the start),
    # keeping the global batch by gradient accumulation: Ray executor, ZeRO 0 (docs/multinode.md)
    elastic: bool = False
    min_workers: int = Field(1, ge=1)

    @field_validator("zero_stage", mode="before")
    @classmethod
    def _stage_3(cls, stage):
        if stage == 3:  # DeepSpeed has it: say why it is not offered
            raise ValueError(
                "distributed.zero_stage=3 is not supported: adder layers are small "
                "next to their activations, so stage 3 saves little; use 0, 1 or 2"
            )
        return stage


class EvalConfig(Section):
    # Re-estimate BatchNorm statistics from this many training micro-batches per worker
    # before each evaluation (0: off). The evaluation and the final export use them; training
    # and checkpoints keep the running statistics (docs/training.md, "Evaluation").
    bn_recalibration_batches: int = Field(0, ge=0)


class CheckpointConfig(Section):
    interval_steps: int | None = Field(None, ge=1)
    interval_minutes: float | None = Field(None, gt=0)
    keep_last: int = Field(2, ge=1)
    keep_best: int = Field(1, ge=0)
    # the checkpoint this launch starts from (set by `addertrain launch --resume`); a restart
    # after a failure continues from the run directory's latest checkpoint instead
    resume: str | None = None


class DistillConfig(Section):
    """Logit distillation from a frozen teacher (addertrain/distill.py); off without a teacher."""

    # an export folder (addertrain export, or a run's final/) of a model for the same classes
    # and inputs, e.g. the AdderNet's CNN twin
    teacher: str | None = None
    temperature: float = Field(4.0, gt=0)
    # the soft (teacher) term's weight; 1 - alpha goes to the labels' cross-entropy
    alpha: float = Field(0.5, ge=0, le=1)


class LoggingConfig(Section):
    interval_steps: int = Field(10, ge=1)
    progress: bool = True
    plots: bool = True
    # TensorBoard event files in the run directory (rank 0), beside metrics.jsonl
    tensorboard: bool = True


class Config(Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    adder: AdderConfig = AdderConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    distributed: DistributedConfig = DistributedConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    distill: DistillConfig = DistillConfig()

    @model_validator(mode="after")
    def _check(self):
        t = self.train
        if t.global_batch % t.micro_batch:
            raise ValueError(
                f"train.global_batch ({t.global_batch}) must be a multiple of train.micro_batch "
                f"({t.micro_batch})"
            )
        if t.global_batch % (t.micro_batch * self.distributed.workers):
            raise ValueError(
                f"train.global_batch ({t.global_batch}) must be a multiple of train.micro_batch x "
                f"distributed.workers ({t.micro_batch} x {self.distributed.workers})"
            )
        self._check_elastic()
        if t.precision == "bf16" and self.distributed.zero_stage != 1:
            raise ValueError(
                f"train.precision=bf16 needs distributed.zero_stage=1 (got "
                f"{self.distributed.zero_stage}): only DeepSpeed's ZeRO-1 bf16 optimizer "
                "accumulates and all-reduces gradients in fp32; set distributed.zero_stage=1, or "
                "train in fp32"
            )
        if self.model.arch == "lenet5" and self.data.image_size != 32:
            raise ValueError(
                f"model.arch=lenet5 takes 32x32 images (its C5 layer covers the 5x5 "
                f"map they leave), not {self.data.image_size}; set data.image_size=32"
            )
        return self

    def _check_elastic(self) -> None:
        d, t = self.distributed, self.train
        if not d.elastic:
            return
        if d.executor != "ray":
            raise ValueError("distributed.elastic needs distributed.executor=ray")
        if d.zero_stage:
            raise ValueError(
                f"distributed.elastic needs distributed.zero_stage=0: a ZeRO {d.zero_stage} "
                "optimizer state is sharded per worker and cannot move to fewer of them"
            )
        if d.min_workers > d.workers:
            raise ValueError(
                f"distributed.min_workers ({d.min_workers}) is more than distributed.workers "
                f"({d.workers})"
            )
        bad = [
            w for w in range(d.min_workers, d.workers + 1) if t.global_batch % (t.micro_batch * w)
        ]
        if bad:
            raise ValueError(
                f"with distributed.elastic the global batch must split over every number of "
                f"workers from {d.min_workers} to {d.workers}, but train.global_batch="
                f"{t.global_batch} with train.micro_batch={t.micro_batch} does not over "
                f"{', '.join(map(str, bad))}; raise distributed.min_workers or choose a global "
                "batch those numbers divide"
            )

    def batch_split(self, world_size: int) -> tuple[int, int]:
        """(micro batch per worker, gradient accumulation steps) over ``world_size`` workers,
        which an external launcher (torchrun, srun) may set apart from distributed.workers."""
        t = self.train
        if t.global_batch % (t.micro_batch * world_size):
            raise UserError(
                f"train.global_batch={t.global_batch} cannot be split over {world_size} worker(s) "
                f"with train.micro_batch={t.micro_batch}: it must be a multiple of micro_batch x "
                f"workers = {t.micro_batch * world_size}"
            )
        return t.micro_batch, t.global_batch // (t.micro_batch * world_size)

    def check_device(self, device_type: str) -> None:
        """What the recipe asks of the device the workers train on ("cuda" or "cpu"), which
        ``train.device=auto`` leaves to the machine."""
        if self.train.precision == "fp16" and device_type != "cuda":
            raise UserError(
                "train.precision=fp16 needs a CUDA device (DeepSpeed has no fp16 on "
                "CPU); use train.precision=bf16 or fp32"
            )

    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self, sections: tuple[str, ...]) -> str:
        """A hash of the given sections, to detect incompatible changes on resume."""
        d = self.to_dict()
        blob = json.dumps({k: d[k] for k in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _model_at(path: tuple) -> type[BaseModel] | None:
    model: Any = Config
    for part in path:
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return None
        model = fields[part].annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _describe(err: dict) -> str:
    loc = tuple(p for p in err["loc"] if not isinstance(p, int))
    path = ".".join(str(p) for p in loc)
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        known = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean {'.'.join(map(str, loc[:-1] + (close[0],)))}?" if close else ""
        return f"unknown key {path}{hint} (allowed here: {', '.join(known)})"
    if kind == "value_error":
        return err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    return f"{path or 'recipe'}: {err['msg']} (got {got!r})"


class DuplicateKeyError(yaml.YAMLError):
    pass


class _Loader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` keys may be overridden in the mapping that merges them
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # the base class refuses it
            if key in seen:
                raise DuplicateKeyError(
                    f"key {key!r} appears twice in one section (line "
                    f"{key_node.start_mark.line + 1}); keep one of them"
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


# YAML 1.1 (PyYAML) reads 1e-3 and 1e30 as strings: it wants a dot and a signed exponent.
# With strict types such a learning rate would be refused, so exponents are floats here.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _parse_value(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} must look like key.path=value, e.g. optim.lr=0.05")
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"override {item!r}: {part} is a value, not a section")
            node = child
        node[parts[-1]] = _parse_value(value)
    return tree


def from_dict(tree: dict, source: str = "recipe") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        problems = [_describe(err) for err in e.errors()]
        raise UserError(f"{source}: " + "; ".join(problems)) from None


def load(path: str | Path, overrides: list[str] = ()) -> Config:
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.yaml"))
        raise UserError(
            f"recipe {path} is a directory; pass a YAML file"
            + (f" from it ({', '.join(inside[:5])})" if inside else " such as recipes/digits.yaml")
        )
    if not path.is_file():
        raise UserError(
            f"recipe {path} does not exist; pass a YAML file such as recipes/digits.yaml"
        )
    try:
        tree = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except UnicodeDecodeError as e:
        raise UserError(
            f"recipe {path} is not UTF-8 text (byte {e.object[e.start]:#04x} at "
            f"offset {e.start}); save it as UTF-8"
        ) from None
    except OSError as e:
        raise UserError(f"cannot read recipe {path}: {e.strerror}") from None
    except DuplicateKeyError as e:
        raise UserError(f"recipe {path}: {e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"recipe {path} is not valid YAML: {e}") from None
    if tree is None:
        raise UserError(
            f"recipe {path} is empty (nothing but comments or null); a recipe names "
            "its sections (run, model, data, ...), see recipes/synthetic_tiny.yaml"
        )
    if not isinstance(tree, dict):
        raise UserError(f"recipe {path} must be a mapping of sections (run, model, data, ...)")
    return from_dict(apply_overrides(tree, list(overrides)), source=str(path))
