"""Checkpoints of a run: DeepSpeed's engine state plus the trainer's state parts, published atomically.

``run_dir/checkpoints`` holds::

    latest          the tag of the newest complete checkpoint, replaced atomically
    step00000120/   one checkpoint: DeepSpeed's files (model, optimizer and schedule; one
                    optimizer file per rank under ZeRO), rank<r>.json per rank (data position,
                    RNG states, progress) and meta.json, written last by rank 0 (the recipe,
                    world size, every file's size, validation top-1)
    tmp-step.../    a checkpoint being written: never loaded, removed at the next start

A checkpoint is written under its ``tmp-`` name by every rank, then rank 0 renames it and
replaces ``latest``, so a crash at any point leaves the previous checkpoint the latest.
Our own state is JSON, so resuming unpickles nothing of ours; DeepSpeed's ``.pt`` files are
first read with ``torch.load(weights_only=True)`` by :func:`verify_tensors` (DeepSpeed itself
loads them with ``weights_only=False``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from addertrain.errors import UserError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
META = "meta.json"
TMP = "tmp-"
FORMAT = 1
# Recipe keys (and sections) a resume must keep: they fix the model, the data order, the
# optimizer and schedule, and the meaning of a step. --allow-change lifts them one by one.
PROTECTED = ("run.seed", "model", "data", "optim", "schedule", "adder", "train.global_batch",
             "train.micro_batch", "train.precision", "train.max_steps", "distributed.zero_stage")
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
        raise UserError(f"--allow-change {', '.join(unknown)}: no such recipe key; name a key such "
                        "as schedule.epochs or a section such as optim")
    return sorted(k for k in s.keys() | c.keys()
                  if _under(k, PROTECTED) and not _under(k, allow) and s.get(k) != c.get(k))


# -- finding and checking a checkpoint ----------------------------------------------------------

def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def _latest_in(folder: Path) -> Path:
    tag = (folder / LATEST).read_text().strip()
    path = folder / tag
    if not tag or not (path / META).is_file():
        raise UserError(f"{folder / LATEST} names checkpoint {tag!r}, which is missing or incomplete; "
                        f"write the tag of a complete checkpoint in {folder} into it, or pass "
                        "--resume PATH")
    return path


def latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run directory, None if it has none."""
    folder = checkpoints_dir(run_dir)
    return _latest_in(folder) if (folder / LATEST).is_file() else None


def find(spec: str | Path) -> Path:
    """A checkpoint given as its own directory, a checkpoints folder or a run directory."""
    path = Path(spec).expanduser().resolve()
    if not path.exists():
        raise UserError(f"checkpoint {spec} does not exist; pass a checkpoint directory "
                        "(RUN_DIR/checkpoints/stepNNNNNNNN) or a run directory")
    for folder in (path, path / CHECKPOINTS):
        if (folder / LATEST).is_file():
            return _latest_in(folder)
    if (path / META).is_file():
        return path
    if path.name.startswith(TMP):
        raise UserError(f"{spec} is a checkpoint that was never finished (a crash while saving); "
                        f"resume from a complete one in {path.parent}")
    raise UserError(f"{spec} is not an addertrain checkpoint (it has no {META} or {LATEST}); pass a "
                    "checkpoint directory (RUN_DIR/checkpoints/stepNNNNNNNN) or a run directory")


def resolve(spec: str, run_dir: Path) -> Path | None:
    """The checkpoint a launch starts from: ``auto`` (the run directory's latest, if any),
    ``none`` (a fresh start) or a path. None means a fresh start."""
    own = latest(run_dir)
    if spec == "auto":
        return own
    if spec == "none":
        if own:
            raise UserError(f"--resume none, but {run_dir} already holds checkpoints (latest "
                            f"{own.name}); continue it with --resume auto, or start afresh under a "
                            "new run.name")
        return None
    path = find(spec)
    if own and path != own:
        raise UserError(f"{run_dir} already holds checkpoints of its own (latest {own.name}); continue "
                        f"it with --resume auto, or start from {spec} under a new run.name")
    return path


def read_meta(path: Path) -> dict:
    """The metadata of a complete checkpoint, after checking that every file is there, whole."""
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path / META} cannot be read ({e}); the checkpoint is damaged, resume from "
                        f"another one in {path.parent}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path} is not a checkpoint of this addertrain version (format "
                        f"{meta.get('format') if isinstance(meta, dict) else None}, expected {FORMAT})")
    for name, size in meta["files"].items():
        f = path / name
        if not f.is_file():
            raise UserError(f"{f} is missing: the checkpoint is incomplete; resume from another one "
                            f"in {path.parent}")
        if f.stat().st_size != size:
            raise UserError(f"{f} has {f.stat().st_size} bytes where {size} were written: it is "
                            f"truncated or damaged; resume from another checkpoint in {path.parent}")
    return meta


def verify_tensors(path: Path, meta: dict) -> None:
    """Read every DeepSpeed file with ``weights_only=True``: only tensors and plain data, so
    DeepSpeed's own unrestricted load afterwards runs no code from the file."""
    import torch

    for name in meta["files"]:
        if name.endswith(".pt"):
            try:
                torch.load(path / name, map_location="cpu", weights_only=True)
            except Exception as e:  # torch raises several types for damaged or unsafe files
                raise UserError(f"{path / name} cannot be read as tensors and plain data "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); it is damaged "
                                "or holds arbitrary objects; resume from another checkpoint") from None


def check_world(meta: dict, path: Path, world_size: int, recipe: dict) -> None:
    """A different number of workers works for replicated state (ZeRO 0) over data whose
    position is global (synthetic); sharded states and sharded folder positions are refused."""
    saved = meta["world_size"]
    if saved == world_size:
        return
    why = None
    if recipe["distributed"]["zero_stage"]:
        why = f"its ZeRO stage {recipe['distributed']['zero_stage']} optimizer state is sharded per worker"
    elif recipe["data"]["source"] == "folder":
        why = "its data position is a per-worker DALI reader position"
    if why:
        raise UserError(f"checkpoint {path} was written by {saved} worker(s) and this run has "
                        f"{world_size}, but {why}; resume with distributed.workers={saved}")


def check_compatible(meta: dict, path: Path, recipe: dict, world_size: int, allow=()) -> None:
    if meta["digest"] != protected_digest(recipe):
        keys = changed_keys(meta["recipe"], recipe, allow)
        if keys:
            s, c = flatten(meta["recipe"]), flatten(recipe)
            what = ", ".join(f"{k} ({s.get(k)!r} -> {c.get(k)!r})" for k in keys)
            raise UserError(f"the recipe differs from checkpoint {path}'s in {what}; resume with the "
                            "checkpoint's values, or pass --allow-change KEY for each deliberate "
                            "change (e.g. --allow-change schedule.epochs)")
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
        state = {"python": [version, list(words), gauss],
                 "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
                 "torch": _b64(torch.get_rng_state())}
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
        if world.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            for partial in self.dir.glob(TMP + "*"):
                print(f"removing the unfinished checkpoint {partial}", flush=True)
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

    def save(self, step: int, top1: float | None = None) -> Path:
        import torch.distributed as dist

        start = time.perf_counter()
        tag = tag_for(step)
        tmp, final = self.dir / (TMP + tag), self.dir / tag
        recipe = self.cfg.to_dict()
        digest = protected_digest(recipe)
        self.engine.save_checkpoint(str(self.dir), tag=tmp.name, save_latest=False,
                                    client_state={"addertrain": {"step": step, "digest": digest}})
        tmp.mkdir(exist_ok=True)
        _write_json(tmp / f"rank{self.world.rank}.json",
                    {name: part.state_dict() for name, part in self.parts.items()})
        dist.barrier()
        if self.world.is_main:
            files = {str(p.relative_to(tmp)): p.stat().st_size
                     for p in sorted(tmp.rglob("*")) if p.is_file()}
            _write_json(tmp / META, {"format": FORMAT, "tag": tag, "step": step, "top1": top1,
                                     "world_size": self.world.world_size, "digest": digest,
                                     "recipe": recipe, "time": time.time(), "files": files})
            if os.environ.get(CRASH_BEFORE_PUBLISH) == str(step):
                os.kill(os.getpid(), signal.SIGKILL)
            self._publish(tmp, final)
            self._retain()
        dist.barrier()
        self.last_save = time.monotonic()
        self.seconds += time.perf_counter() - start
        self._report_to_ray(final, step, top1)
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

    def _retain(self) -> None:
        """Keep the last ``keep_last`` checkpoints and the ``keep_best`` by validation top-1."""
        c = self.cfg.checkpoint
        metas = sorted((json.loads((p / META).read_text()) for p in self.dir.iterdir()
                        if (p / META).is_file() and not p.name.startswith(TMP)),
                       key=lambda m: m["step"])
        keep = {m["tag"] for m in metas[-c.keep_last:]}
        scored = sorted((m for m in metas if m["top1"] is not None), key=lambda m: -m["top1"])
        keep |= {m["tag"] for m in scored[:c.keep_best]}
        for m in metas:
            if m["tag"] not in keep:
                shutil.rmtree(self.dir / m["tag"])

    def _report_to_ray(self, path: Path, step: int, top1: float | None) -> None:
        """Tell Ray Train about the checkpoint (it lies in the run directory, which is the Ray
        experiment directory, so nothing is copied)."""
        if self.cfg.distributed.executor != "ray":
            return
        import ray.train
        from ray.train import Checkpoint, CheckpointUploadMode

        metrics = {"step": step, **({"top1": top1} if top1 is not None else {})}
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(path)) if self.world.is_main
                         else None, checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)

    def load(self, path: Path) -> dict:
        """Restore the engine and this rank's parts from ``path``; returns its metadata."""
        meta = read_meta(path)
        check_world(meta, path, self.world.world_size, self.cfg.to_dict())
        loaded, _ = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        if loaded is None:
            raise UserError(f"DeepSpeed found no model state in {path}; resume from another checkpoint")
        own = path / f"rank{min(self.world.rank, meta['world_size'] - 1)}.json"
        state = json.loads(own.read_text())
        for name, part in self.parts.items():
            part.load_state_dict(state[name])
        return meta
