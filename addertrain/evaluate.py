"""Evaluation: the metrics of one pass over a validation loader (used by the trainer), and
``addertrain eval PATH``: top-1/top-5 of an export or a checkpoint on a dataset, in one process."""

from __future__ import annotations

import json
from pathlib import Path

HELP = "evaluate an export or a checkpoint on a dataset and print top-1/top-5"


def eval_sums(model, loader, dtype, device):
    """(summed loss, top-1 hits, top-5 hits, samples) over one pass of ``loader``, as a
    float64 tensor on ``device``."""
    import torch  # here, not at the top: `addertrain --help` imports this module
    import torch.nn.functional as F

    sums = torch.zeros(4, dtype=torch.float64, device=device)
    with torch.no_grad():
        for images, labels, valid in loader:
            logits = model(images.to(dtype)).float()[:valid]
            labels = labels[:valid]
            top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hits = top5 == labels[:, None]
            sums += torch.stack(
                [
                    F.cross_entropy(logits, labels, reduction="sum"),
                    hits[:, 0].sum(),
                    hits.any(1).sum(),
                    torch.tensor(valid, device=logits.device),
                ]
            ).double()
    return sums


def eval_summary(sums, num_classes: int) -> dict:
    """Mean loss, top-1 and top-5 (%); top-5 is None with 5 classes or fewer, where every
    sample would count as a hit."""
    loss, top1, top5, n = sums.tolist()
    return {
        "loss": loss / n,
        "top1": 100 * top1 / n,
        "top5": 100 * top5 / n if num_classes > 5 else None,
        "samples": int(n),
    }


def add_arguments(p) -> None:
    p.add_argument(
        "path",
        help="an export folder (model.safetensors + config.yaml, e.g. RUN_DIR/final), "
        "a checkpoint directory or a run directory (its latest checkpoint)",
    )
    p.add_argument(
        "--data",
        help="dataset root (ImageNet layout, CIFAR python batches or MNIST IDX files), or "
        "'synthetic' for the generated data; default: the dataset of the model's recipe",
    )
    p.add_argument(
        "--split", help="split folder to evaluate (default: the recipe's data.val_split)"
    )
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--json", help="also write the result to this JSON file")


def run(args) -> int:
    import torch

    from addertrain import config
    from addertrain.data import build_loader
    from addertrain.data.prepare import prepare_data
    from addertrain.errors import UserError
    from addertrain.metrics import eval_line
    from addertrain.model_io import WEIGHTS, load_model

    if args.batch < 1:
        raise UserError(f"--batch {args.batch}: give a positive batch size")
    model, cfg = load_model(args.path)
    if cfg.eval.bn_recalibration_batches and not (Path(args.path) / WEIGHTS).is_file():
        print(
            f"note: a checkpoint holds the training BatchNorm statistics; its run evaluated with "
            f"statistics re-estimated from {cfg.eval.bn_recalibration_batches} training batches "
            "(eval.bn_recalibration_batches), as its final export holds them"
        )
    tree = cfg.to_dict()
    if args.data == "synthetic":
        tree["data"]["source"] = "synthetic"
    elif args.data:
        from addertrain.data.check import array_source

        source = array_source(args.data) or "folder"
        tree["data"].update(source=source, root=args.data, prepare=None)
    if args.split:
        tree["data"]["val_split"] = args.split
    cfg = config.from_dict(tree, "the evaluation settings")
    prepare_data(cfg, training=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = build_loader(cfg, "val", args.batch, 0, 1, device)
    result = eval_summary(
        eval_sums(model.to(device), loader, torch.float32, device), cfg.model.num_classes
    )
    source = "synthetic data" if cfg.data.source == "synthetic" else cfg.data.root
    print(
        f"{args.path} on {source} ({cfg.data.val_split}, {result['samples']} images): "
        f"{eval_line(result)}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"path": str(args.path), "data": source, **result}, f, indent=2)
    return 0
