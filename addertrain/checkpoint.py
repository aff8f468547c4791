"""Checkpoints of a run: DeepSpeed's engine state plus the trainer's state parts, published
atomically.

``run_dir/checkpoints`` holds::

    latest          the tag of the newest complete checkpoint, replaced atomically
    step00000120/   one checkpoint: DeepSpeed's files (model, optimizer and schedule; one
                    optimizer file per rank under ZeRO), rank<r>.json per rank (data position,
                    RNG states, progress) and meta.json, written last by rank 0 (the recipe,
                    world size, every file's size, validation top-1)
    tmp-step.../    a checkpoint being written: never loaded, removed at the next start

A checkpoint is written under its ``tmp-`` name by every rank, then rank 0 renames it and
replaces ``latest``, so a crash at any point leaves the previous checkpoint the latest.
Our own state is JSON, so resuming unpickles nothing of ours. DeepSpeed picks the names of the
``.pt`` files it loads itself and unpickles them with ``weights_only=False``, so every process
that loads a checkpoint first runs :func:`verify` on it (every file listed in meta.json with its
size, nothing else in the folder, every ``.pt`` readable with ``weights_only=True``), and the
workers force ``weights_only=True`` on every ``torch.load`` besides (:mod:`addertrain.worker`).

This module is the one bookkeeper of the checkpoints (retention, ``latest``, resume): none is
reported to Ray Train, whose own manager would keep a second list of them in the run
directory (docs/resume.md).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from addertrain.console import LOG
from addertrain.errors import UserError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"
TMP = "tmp-"
TAG = re.compile(r"step\d{8,}")  # what tag_for writes
FORMAT = 1
# Recipe keys (and sections) a resume must keep: they fix the model, the data order, the
# optimizer and schedule, and the meaning of a step. --allow-change lifts them one by one.
PROTECTED = (
    "run.seed",
    "model",
    "data",
    "optim",
    "schedule",
    "adder",
    "train.global_batch",
    "train.micro_batch",
    "train.precision",
    "train.max_steps",
    "distributed.zero_stage",
)
# Test hook: rank 0 dies (SIGKILL) after writing the checkpoint of this step, before publishing it.
CRASH_BEFORE_PUBLISH = "ADDERTRAIN_CRASH_BEFORE_PUBLISH"


# -- recipe comparison --------------------------------------------------------------------------


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def protected_digest(recipe: dict) -> str:
    """A hash of the values a resume must keep."""
    flat = {k: v for k, v in flatten(recipe).items() if _under(k, PROTECTED)}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def changed_keys(saved: dict, current: dict, allow=()) -> list[str]:
    s, c = flatten(saved), flatten(current)
    unknown = [a for a in allow if not any(_under(k, [a]) for k in c)]
    if unknown:
        raise UserError(
            f"--allow-change {', '.join(unknown)}: no such recipe key; name a key such "
            "as schedule.epochs or a section such as optim"
        )
    return sorted(
        k
        for k in s.keys() | c.keys()
        if _under(k, PROTECTED) and not _under(k, allow) and s.get(k) != c.get(k)
    )


# -- finding and checking a checkpoint ----------------------------------------------------------


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _latest_in(folder: Path) -> Path:
    tag = (folder / LATEST).read_text().strip()
    path = folder / tag
    if not tag or not (path / META).is_file():
        raise UserError(
            f"{folder / LATEST} names checkpoint {tag!r}, which is missing or incomplete; "
            f"write the tag of a complete checkpoint in {folder} into it, or pass "
            "--resume PATH"
        )
    return path


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, None if it has none."""
    folder = checkpoints_dir(run_dir)
    return _latest_in(folder) if (folder / LATEST).is_file() else None


def find(spec: str | Path) -> Path:
    """A checkpoint given as its own directory, a checkpoints folder or a run directory."""
    path = Path(spec).expanduser().resolve()
    if not path.exists():
        raise UserError(
            f"checkpoint {spec} does not exist; pass a checkpoint directory "
            "(RUN_DIR/checkpoints/stepNNNNNNNN) or a run directory"
        )
    for folder in (path, path / CHECKPOINTS):
        if (folder / LATEST).is_file():
            return _latest_in(folder)
    if (path / META).is_file():
        return path
    if path.name.startswith(TMP):
        raise UserError(
            f"{spec} is a checkpoint that was never finished (a crash while saving); "
            f"resume from a complete one in {path.parent}"
        )
    raise UserError(
        f"{spec} is not an addertrain checkpoint (it has no {META} or {LATEST}); pass a "
        "checkpoint directory (RUN_DIR/checkpoints/stepNNNNNNNN) or a run directory"
    )


def resolve(spec: str, run_dir: Path) -> Path | None:
    """The checkpoint a launch starts from: ``auto`` (the run directory's latest, if any),
    ``none`` (a fresh start) or a path. None means a fresh start."""
    own = latest(run_dir)
    if spec == "auto":
        return own
    if spec == "none":
        if own:
            raise UserError(
                f"--resume none, but {run_dir} already holds checkpoints (latest "
                f"{own.name}); continue it with --resume auto, or start afresh under a "
                "new run.name"
            )
        return None
    path = find(spec)
    if own and path != own:
        raise UserError(
            f"{run_dir} already holds checkpoints of its own (latest {own.name}); continue "
            f"it with --resume auto, or start from {spec} under a new run.name"
        )
    return path


def _entries(path: Path) -> dict[str, Path]:
    """Everything under a checkpoint directory but plain directories (files, links, sockets),
    by name relative to it."""
    return {
        p.relative_to(path).as_posix(): p
        for p in path.rglob("*")
        if p.is_symlink() or not p.is_dir()
    }


def read_meta(path: Path) -> dict:
    """The metadata of a complete checkpoint, after checking that every file it lists is there,
    whole, and that the folder holds nothing else: DeepSpeed finds its files by name pattern, so
    an unlisted ``.pt`` would be unpickled without ever being verified."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as e:
        raise UserError(
            f"{path / META} cannot be read ({e}); the checkpoint is damaged, resume from "
            f"another one in {path.parent}"
        ) from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(
            f"{path} is not a checkpoint of this addertrain version (format "
            f"{meta.get('format') if isinstance(meta, dict) else None}, expected {FORMAT})"
        )
    files = meta.get("files")
    if not isinstance(files, dict) or not all(type(size) is int for size in files.values()):
        raise UserError(
            f"{path / META} has no valid list of files; the checkpoint is damaged, resume "
            f"from another one in {path.parent}"
        )
    entries = _entries(path)
    for name, size in files.items():
        f = entries.get(name)
        if f is None or f.is_symlink() or not f.is_file():
            raise UserError(
                f"{path / name} is missing (or not a regular file inside {path}): the "
                f"checkpoint is incomplete; resume from another one in {path.parent}"
            )
        if _size(f) != size:
            raise UserError(
                f"{f} has {_size(f)} bytes where {size} were written: it is "
                f"truncated or damaged; resume from another checkpoint in {path.parent}"
            )
    unlisted = sorted(entries.keys() - files.keys() - {META})
    if unlisted:
        shown = ", ".join(unlisted[:3]) + (
            f" and {len(unlisted) - 3} more" if len(unlisted) > 3 else ""
        )
        raise UserError(
            f"{path} holds {len(unlisted)} file(s) that its {META} does not list ({shown}); "
            "they were not written with the checkpoint and would be loaded unverified: "
            "remove them if you know where they come from, or use another checkpoint"
        )
    return meta


def _size(f: Path) -> int:
    """The size of an opened file: on NFS, opening revalidates the attributes a client may
    have cached from before another node finished writing (close-to-open consistency)."""
    with open(f, "rb") as handle:
        return os.fstat(handle.fileno()).st_size


def _unpickle_reason(e: Exception) -> str:
    """The part of torch's long weights-only message that says what was found."""
    text = str(e).split("WeightsUnpickler error:", 1)[-1]
    first = next((part for part in text.split("\n\n") if part.strip()), "")
    return " ".join(first.split()).split(". ")[0][:200]


def deepspeed_types() -> list:
    """The DeepSpeed classes its ZeRO and bf16 optimizer states pickle (fragment addresses, the
    loss scaler, the ZeRO stage): plain data, built without running code of theirs, so they are
    allowed in weights-only loads."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [fragment_address, LossScaler, DynamicLossScaler, ZeroStageEnum]


def verify_tensors(path: Path, meta: dict) -> None:
    """Read every DeepSpeed file with ``weights_only=True``: only tensors and plain data, so
    DeepSpeed's own load afterwards runs no code from the file."""
    import torch

    for name in meta["files"]:
        if name.endswith(".pt"):
            try:
                with torch.serialization.safe_globals(deepspeed_types()):
                    torch.load(path / name, map_location="cpu", weights_only=True)
            except Exception as e:  # torch raises several types for damaged or unsafe files
                raise UserError(
                    f"{path / name} cannot be read as tensors and plain data "
                    f"({type(e).__name__}: {_unpickle_reason(e)}); it is damaged or holds "
                    "arbitrary objects (code that would run on loading); use another "
                    "checkpoint"
                ) from None


def summary(error: Exception) -> str:
    """The first two lines of an error, for a one-line message (torch's load_state_dict puts
    the first mismatch on the second)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:2])[:240]


def verify(path: Path) -> dict:
    """Everything checked before a checkpoint is loaded (:func:`read_meta`,
    :func:`verify_tensors`), in the process that loads it; returns the metadata."""
    meta = read_meta(path)
    verify_tensors(path, meta)
    return meta


def check_world(meta: dict, path: Path, world_size: int, recipe: dict) -> None:
    """A different number of workers works for replicated state (ZeRO 0): the data position
    follows from the step (data/sharding.py). A sharded optimizer state is refused."""
    saved, stage = meta["world_size"], recipe["distributed"]["zero_stage"]
    if saved != world_size and stage:
        raise UserError(
            f"checkpoint {path} was written by {saved} worker(s) and this run has "
            f"{world_size}, but its ZeRO stage {stage} optimizer state is sharded per worker; "
            f"resume with distributed.workers={saved}"
        )


def check_compatible(meta: dict, path: Path, recipe: dict, world_size: int, allow=()) -> None:
    if meta["digest"] != protected_digest(recipe):
        keys = changed_keys(meta["recipe"], recipe, allow)
        if keys:
            s, c = flatten(meta["recipe"]), flatten(recipe)
            what = ", ".join(f"{k} ({s.get(k)!r} -> {c.get(k)!r})" for k in keys)
            raise UserError(
                f"the recipe differs from checkpoint {path}'s in {what}; resume with the "
                "checkpoint's values, or pass --allow-change KEY for each deliberate "
                "change (e.g. --allow-change schedule.epochs)"
            )
    check_world(meta, path, world_size, recipe)


# -- state parts --------------------------------------------------------------------------------


def _b64(t) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _tensor(text: str):
    import torch

    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


class RNGState:
    """The random generators of this process (python, numpy, torch, CUDA) as JSON-safe data."""

    def state_dict(self) -> dict:
        import numpy as np
        import torch

        version, words, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "python": [version, list(words), gauss],
            "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
            "torch": _b64(torch.get_rng_state()),
        }
        if torch.cuda.is_available():
            state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
        return state

    def load_state_dict(self, state: dict) -> None:
        import numpy as np
        import torch

        version, words, gauss = state["python"]
        random.setstate((version, tuple(words), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        torch.set_rng_state(_tensor(state["torch"]))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([_tensor(s) for s in state["cuda"]])


# -- retention ----------------------------------------------------------------------------------


def _own(folder: Path) -> list[tuple[Path, dict]]:
    """The checkpoints retention may delete: direct subfolders named stepNNNNNNNN whose meta.json
    has that step. A tag read from meta.json is never used as a path, so neither a tampered tag
    nor a copy under another name (a backup) can make retention delete something else."""
    own = []
    for p in folder.iterdir():
        if not TAG.fullmatch(p.name) or p.is_symlink() or not p.is_dir():
            continue
        try:
            meta = json.loads((p / META).read_text())
        except (OSError, ValueError):
            continue
        if (
            isinstance(meta, dict)
            and type(meta.get("step")) is int
            and tag_for(meta["step"]) == p.name
        ):
            own.append((p, meta))
    return own


def retain(folder: Path, keep_last: int, keep_best: int, current: Path) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints, the ``keep_best`` by validation top-1
    and ``current`` (the one just published); returns the deleted."""
    own = sorted(_own(folder), key=lambda entry: entry[1]["step"])
    keep = {p for p, _ in own[-keep_last:]} | {current}
    scored = [(p, m["top1"]) for p, m in own if type(m.get("top1")) in (int, float)]
    keep |= {p for p, _ in sorted(scored, key=lambda entry: -entry[1])[:keep_best]}
    gone = [p for p, _ in own if p not in keep]
    for p in gone:
        shutil.rmtree(p)
    return gone


# -- the manager --------------------------------------------------------------------------------


def _write_json(path: Path, data) -> None:
    with open(path, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _recording_writes(engine):
    """The paths DeepSpeed's checkpoint engine writes in this process while inside."""
    written: list[str] = []
    ce = engine.checkpoint_engine
    original = ce.save

    def save(state_dict, path):
        original(state_dict, path)
        written.append(path)

    ce.save = save
    try:
        yield written
    finally:
        ce.save = original


@contextlib.contextmanager
def _storage_errors(tmp: Path):
    """A checkpoint that cannot be written (full disk, read-only, no permission) ends the run
    with one line; its unfinished folder goes, the published checkpoints stay."""
    from addertrain.storage import describe_write_error

    try:
        yield
    except (OSError, RuntimeError) as e:
        message = describe_write_error(e, tmp)
        if message is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(message) from None


class Checkpointer:
    """Saves and restores the DeepSpeed engine and named state parts (objects with
    ``state_dict()``/``load_state_dict()`` of JSON-safe data), every rank its own."""

    def __init__(self, cfg, world, engine, parts: dict):
        self.cfg, self.world, self.engine, self.parts = cfg, world, engine, parts
        self.dir = checkpoints_dir(cfg.run_dir())
        c = cfg.checkpoint
        self.every_steps = c.interval_steps
        self.every_s = c.interval_minutes * 60 if c.interval_minutes else None
        self.last_save = time.monotonic()
        self.seconds = 0.0  # time spent saving, for the result summary
        self.best_top1: float | None = None  # the best validation top-1 saved by this run so far
        if world.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            for partial in self.dir.glob(TMP + "*"):
                LOG.info(f"removing the unfinished checkpoint {partial}")
                shutil.rmtree(partial)

    def poll(self, step: int) -> tuple[bool, bool]:
        """(a checkpoint is due, the run must stop), the same on every rank: rank 0 owns the
        clock and the preemption request, and tells the others."""
        from addertrain import preempt

        flags = [bool(self.every_steps and step % self.every_steps == 0), False, False]
        if self.world.is_main:
            flags[1] = bool(self.every_s and time.monotonic() - self.last_save >= self.every_s)
            flags[2] = preempt.requested(self.cfg.run_dir())
        if self.world.world_size > 1:
            import torch
            import torch.distributed as dist

            t = torch.tensor(flags, dtype=torch.float32, device=self.world.device)
            dist.broadcast(t, 0)
            flags = [bool(x) for x in t.tolist()]
        due_steps, due_time, stop = flags
        return due_steps or due_time or stop, stop

    def wants_save_after_eval(self, top1: float) -> bool:
        """Whether an evaluation's result deserves a checkpoint of its own: only a new best
        that ``checkpoint.keep_best`` would keep (other evaluations wait for the periodic
        checkpoint). The same answer on every rank: ``top1`` is all-reduced."""
        return bool(self.cfg.checkpoint.keep_best) and (
            self.best_top1 is None or top1 > self.best_top1
        )

    def save(self, step: int, top1: float | None = None) -> Path:
        import torch.distributed as dist

        start = time.perf_counter()
        tag = tag_for(step)
        tmp, final = self.dir / (TMP + tag), self.dir / tag
        recipe = self.cfg.to_dict()
        digest = protected_digest(recipe)
        own = tmp / f"rank{self.world.rank}.json"
        with _storage_errors(tmp), _recording_writes(self.engine) as written:
            self.engine.save_checkpoint(
                str(self.dir),
                tag=tmp.name,
                save_latest=False,
                client_state={"addertrain": {"step": step, "digest": digest}},
            )
            tmp.mkdir(exist_ok=True)
            _write_json(own, {name: part.state_dict() for name, part in self.parts.items()})
        # Each rank reports the sizes of the files it wrote, as it wrote them: on shared storage
        # rank 0 may not see another node's files yet, or see them with stale sizes.
        mine = {str(Path(p).relative_to(tmp)): os.stat(p).st_size for p in [*written, own]}
        reports = [None] * self.world.world_size if self.world.is_main else None
        dist.gather_object(mine, reports, dst=0)  # also a barrier: every rank has written
        if top1 is not None and (self.best_top1 is None or top1 > self.best_top1):
            self.best_top1 = top1
        if self.world.is_main:
            # What no rank reported was copied in by DeepSpeed on this rank (ZeRO's
            # zero_to_fp32.py), so this rank's own listing is right for it.
            files = {
                str(p.relative_to(tmp)): p.stat().st_size for p in tmp.rglob("*") if p.is_file()
            }
            for report in reports:
                files.update(report)
            _write_json(
                tmp / META,
                {
                    "format": FORMAT,
                    "tag": tag,
                    "step": step,
                    "top1": top1,
                    "best_top1": self.best_top1,
                    "world_size": self.world.world_size,
                    "digest": digest,
                    "recipe": recipe,
                    "time": time.time(),
                    "files": dict(sorted(files.items())),
                },
            )
            if os.environ.get(CRASH_BEFORE_PUBLISH) == str(step):
                os.kill(os.getpid(), signal.SIGKILL)
            self._publish(tmp, final)
            self._retain(final)
        dist.barrier()
        self.last_save = time.monotonic()
        self.seconds += time.perf_counter() - start
        return final

    def _publish(self, tmp: Path, final: Path) -> None:
        if final.exists():  # the same step saved again (a run restarted before this step)
            shutil.rmtree(final)
        os.rename(tmp, final)
        pointer = self.dir / (LATEST + ".tmp")
        pointer.write_text(final.name)
        with open(pointer) as f:
            os.fsync(f.fileno())
        os.replace(pointer, self.dir / LATEST)
        _fsync_dir(self.dir)

    def _retain(self, current: Path) -> None:
        c = self.cfg.checkpoint
        for path in retain(self.dir, c.keep_last, c.keep_best, current):
            LOG.debug(
                f"removed the checkpoint {path} (checkpoint.keep_last={c.keep_last}, "
                f"keep_best={c.keep_best})"
            )

    def load(self, path: Path, skip: tuple[str, ...] = ()) -> dict:
        """Restore the engine and this rank's parts but ``skip`` from ``path``; returns its
        metadata."""
        meta = verify(path)  # here too: this process may not be the one that checked it at launch
        recipe = self.cfg.to_dict()
        check_world(meta, path, self.world.world_size, recipe)
        import torch

        try:
            with torch.serialization.safe_globals(
                deepspeed_types()
            ):  # the workers load weights only
                loaded, _ = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        except (RuntimeError, ValueError, KeyError) as e:  # torch's strict load_state_dict and
            # the optimizer's group check, when --allow-change let the shapes change
            raise UserError(_mismatch_message(path, meta, recipe, e)) from None
        if loaded is None:
            raise UserError(
                f"DeepSpeed found no model state in {path}; resume from another checkpoint"
            )
        own = path / f"rank{min(self.world.rank, meta['world_size'] - 1)}.json"
        state = json.loads(own.read_text())
        for name, part in self.parts.items():
            if name not in skip:
                part.load_state_dict(state[name])
        best = meta.get("best_top1", meta.get("top1"))  # checkpoints before best_top1 existed
        self.best_top1 = best if type(best) in (int, float) else None
        return meta


def _mismatch_message(path: Path, meta: dict, recipe: dict, error: Exception) -> str:
    saved = meta.get("recipe") if isinstance(meta.get("recipe"), dict) else {}
    keys = ", ".join(changed_keys(saved, recipe)) or "no protected key"
    return (
        f"the state in checkpoint {path} does not fit this recipe's model or optimizer "
        f"({type(error).__name__}: {summary(error)}); the recipe changed {keys}: "
        "--allow-change takes changes that keep the weights' shapes (e.g. schedule.epochs), not "
        "another architecture or number of classes; resume with the checkpoint's values, or "
        "start afresh under a new run.name"
    )
