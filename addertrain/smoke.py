"""Smoke mode: the recipe shrunk to a few steps on one device, and a pass/fail verdict."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from addertrain.config import Config, from_dict

STEPS = 10


def shrink(cfg: Config) -> tuple[Config, list[str]]:
    """A few steps, one worker, the local executor; synthetic data when the dataset is absent."""
    notes = []
    tree = cfg.to_dict()
    on_gpu = torch.cuda.is_available() and cfg.train.device != "cpu"
    micro = min(cfg.train.micro_batch, 32 if on_gpu else 8)
    image = cfg.data.image_size if on_gpu else min(cfg.data.image_size, 64)
    root = cfg.data.root and Path(cfg.data.root).expanduser()
    if cfg.data.source != "synthetic" and not (root and root.is_dir()) and not cfg.data.prepare:
        notes.append(f"dataset {cfg.data.root} not found: using synthetic data")
        tree["data"]["source"] = "synthetic"
    if tree["data"]["source"] == "synthetic":
        # One batch of a few classes, seen every step: a working installation must fit it
        # (1,000 classes from 32 images is too little signal for a handful of steps).
        tree["data"]["synthetic"] = {"train_size": micro, "val_size": 2 * micro}
        tree["model"]["num_classes"] = min(cfg.model.num_classes, 10)
    if image != cfg.data.image_size:
        notes.append(f"image size {cfg.data.image_size} -> {image} on the CPU")
    tree["data"]["image_size"] = image
    if tree["data"]["eval_resize"]:
        tree["data"]["eval_resize"] = max(image, round(image * 256 / 224))
    tree["train"].update(global_batch=micro, micro_batch=micro, max_steps=STEPS, eval_interval=0)
    tree["schedule"].update(kind="constant", warmup_epochs=0)
    # bf16 runs only with ZeRO 1's fp32 gradient accumulation (config.py)
    zero_stage = 1 if cfg.train.precision == "bf16" else 0
    tree["distributed"].update(executor="local", workers=1, zero_stage=zero_stage)
    tree["logging"]["interval_steps"] = 1
    tree["run"]["name"] = cfg.run.name + "-smoke"
    return from_dict(tree, "smoke recipe"), notes


def verdict(records: list[dict], result: dict) -> tuple[bool, list[str]]:
    """Pass when every logged loss is finite, the loss fell, and evaluation ran."""
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    problems = []
    if not all(math.isfinite(x) for x in losses):
        problems.append("a loss was not finite")
    elif not min(losses[len(losses) // 2 :]) < 0.95 * losses[0]:
        problems.append(f"loss did not fall ({losses[0]:.4f} -> {losses[-1]:.4f})")
    if not result["eval"] or not math.isfinite(result["eval"]["loss"]):
        problems.append("evaluation did not run")
    return not problems, problems
