"""``addertrain eval PATH``: top-1/top-5 of an export or a checkpoint on a dataset, in one process."""

from __future__ import annotations

import json

HELP = "evaluate an export or a checkpoint on a dataset and print top-1/top-5"


def add_arguments(p) -> None:
    p.add_argument("path", help="an export folder (model.safetensors + config.yaml, e.g. RUN_DIR/final), "
                                "a checkpoint directory or a run directory (its latest checkpoint)")
    p.add_argument("--data", help="dataset root in ImageNet layout, or 'synthetic' for the generated "
                                  "data; default: the dataset of the model's recipe")
    p.add_argument("--split", help="split folder to evaluate (default: the recipe's data.val_split)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--json", help="also write the result to this JSON file")


def run(args) -> int:
    import torch

    from addertrain import config
    from addertrain.data import build_loader
    from addertrain.errors import UserError
    from addertrain.export import load_model
    from addertrain.launch.command import prepare_data
    from addertrain.metrics import eval_line
    from addertrain.trainer import eval_sums, eval_summary

    if args.batch < 1:
        raise UserError(f"--batch {args.batch}: give a positive batch size")
    model, cfg = load_model(args.path)
    tree = cfg.to_dict()
    if args.data == "synthetic":
        tree["data"]["source"] = "synthetic"
    elif args.data:
        tree["data"].update(source="folder", root=args.data, prepare=None)
    if args.split:
        tree["data"]["val_split"] = args.split
    cfg = config.from_dict(tree, "the evaluation settings")
    prepare_data(cfg, training=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = build_loader(cfg, "val", args.batch, 0, 1, device)
    result = eval_summary(eval_sums(model.to(device), loader, torch.float32, device),
                          cfg.model.num_classes)
    source = cfg.data.root if cfg.data.source == "folder" else "synthetic data"
    print(f"{args.path} on {source} ({cfg.data.val_split}, {result['samples']} images): "
          f"{eval_line(result)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"path": str(args.path), "data": source, **result}, f, indent=2)
    return 0
