"""``addertrain export CHECKPOINT OUT``: the model alone, usable without DeepSpeed or Ray
(the export format: :mod:`addertrain.model_io`)."""

from __future__ import annotations

HELP = "write a checkpoint's model alone (safetensors + config.yaml) for evaluation or fine-tuning"


def add_arguments(p) -> None:
    p.add_argument(
        "checkpoint",
        help="a checkpoint directory (RUN_DIR/checkpoints/stepNNNNNNNN) or "
        "a run directory (its latest checkpoint)",
    )
    p.add_argument("out", help="folder to write model.safetensors and config.yaml into")


def run(args) -> int:
    from addertrain.model_io import CONFIG, WEIGHTS, checkpoint_model, write_model

    state, recipe, path = checkpoint_model(args.checkpoint)
    out = write_model(state, recipe, args.out)
    print(f"exported {path} to {out / WEIGHTS} and {out / CONFIG}")
    return 0
