"""A model alone, without DeepSpeed or Ray: built from a recipe, written as an export, read
back from an export or a checkpoint.

An export is a folder with ``model.safetensors`` (fp32 weights and BN buffers) and
``config.yaml`` (the run's recipe, which rebuilds the model); a finished run's ``final/``
folder is one too.
"""

from __future__ import annotations

from pathlib import Path

from addertrain import checkpoint, config
from addertrain.errors import UserError

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
DEEPSPEED_MODEL = "mp_rank_00_model_states.pt"


def create_model_from_config(cfg: config.Config):
    """The network ``cfg.model`` describes, for ``cfg.data``'s image channels, with the adder
    layers' backward rules of ``cfg.adder``."""
    from addertrain.models import create_model

    m = cfg.model
    return create_model(
        m.arch,
        conv=m.conv,
        num_classes=m.num_classes,
        head=m.head,
        backend=m.backend,
        bn_momentum=m.bn_momentum,
        in_channels=cfg.data.channels,
        grad=cfg.adder.grad,
        input_grad=cfg.adder.input_grad,
    )


def write_model(state: dict, recipe: dict, out: str | Path) -> Path:
    """Save a model state dict (floats as fp32) and the recipe that builds it into ``out``."""
    import yaml
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in state.items()
    }
    save_file(tensors, str(out / WEIGHTS))
    (out / CONFIG).write_text(yaml.safe_dump(recipe, sort_keys=False))
    return out


def checkpoint_model(spec: str | Path) -> tuple[dict, dict, Path]:
    """(model state dict, recipe, checkpoint path) of a checkpoint, read with weights_only."""
    import torch

    path = checkpoint.find(spec)
    meta = checkpoint.verify(path)
    state = (
        torch.load(path / DEEPSPEED_MODEL, map_location="cpu", weights_only=True)
        if DEEPSPEED_MODEL in meta["files"]
        else None
    )
    module = state.get("module") if isinstance(state, dict) else None
    if not (
        isinstance(module, dict)
        and module
        and all(torch.is_tensor(v) for v in module.values())
        and isinstance(meta.get("recipe"), dict)
    ):
        raise UserError(
            f"{path} holds no model weights addertrain can read (a {DEEPSPEED_MODEL} "
            "with a 'module' of tensors, and the recipe in meta.json); it is not a "
            "checkpoint of a ZeRO 0-2 addertrain run: pass another checkpoint or an "
            "export folder"
        )
    return module, meta["recipe"], path


def load_model(spec: str | Path):
    """(model in eval mode, Config) from an export folder or a checkpoint."""
    path = Path(spec).expanduser()
    if (path / WEIGHTS).is_file():
        from safetensors.torch import load_file

        if not (path / CONFIG).is_file():
            raise UserError(
                f"{path} has {WEIGHTS} but no {CONFIG}; export it again with "
                "`addertrain export CHECKPOINT OUT`"
            )
        cfg = config.load(path / CONFIG)
        try:
            state = load_file(str(path / WEIGHTS))
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise UserError(f"{path / WEIGHTS} cannot be read ({e}); export it again") from None
    else:
        state, recipe, _ = checkpoint_model(path)
        cfg = config.from_dict(recipe, f"the recipe saved in {path}")
    model = create_model_from_config(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(
            f"the weights in {path} do not fit the model its config describes "
            f"({checkpoint.summary(e)})"
        ) from None
    return model.eval(), cfg
