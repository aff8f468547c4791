"""Logit distillation from a frozen teacher (Hinton et al., 2015), e.g. the AdderNet's CNN
twin: the student learns from the teacher's softened class probabilities as well as the labels.

    loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, labels)

The T^2 keeps the soft term's gradient on the scale of the hard one's as T changes. The
teacher is an export (``addertrain export``, or a finished run's ``final/``), read with
``weights_only`` like every model file, and runs in eval mode in each worker on the batch
the student sees.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from addertrain.config import Config
from addertrain.errors import UserError

# what the teacher's inputs must share with the student's, so both see the same images
SAME_INPUT = ("image_size", "channels", "mean", "std")


def loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    soft = (
        F.kl_div(
            F.log_softmax(student / temperature, dim=1),
            F.log_softmax(teacher / temperature, dim=1),
            reduction="batchmean",
            log_target=True,
        )
        * temperature**2
    )
    hard = F.cross_entropy(student, labels, label_smoothing=label_smoothing)
    return alpha * soft + (1 - alpha) * hard


class Teacher:
    """The frozen teacher; ``seconds`` adds up the time of its forward passes."""

    def __init__(self, cfg: Config, device: torch.device):
        from addertrain.model_io import load_model

        path = cfg.distill.teacher
        try:
            model, teacher_cfg = load_model(path)
        except UserError as e:
            raise UserError(f"distill.teacher: {e}") from None
        if teacher_cfg.model.num_classes != cfg.model.num_classes:
            raise UserError(
                f"distill.teacher {path} has {teacher_cfg.model.num_classes} classes "
                f"and the student {cfg.model.num_classes}; distil from a teacher "
                "trained on the same classes"
            )
        differ = [k for k in SAME_INPUT if getattr(teacher_cfg.data, k) != getattr(cfg.data, k)]
        if differ:
            pairs = ", ".join(
                f"data.{k}: teacher {getattr(teacher_cfg.data, k)}, student {getattr(cfg.data, k)}"
                for k in differ
            )
            raise UserError(
                f"distill.teacher {path} was trained on other inputs ({pairs}); "
                "set the student's to the teacher's, or train a teacher on these"
            )
        self.model = model.to(device).eval().requires_grad_(False)
        self.device = device
        self.seconds = 0.0

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        logits = self.model(images.float()).float()
        if self.device.type == "cuda":
            # the cost is what users ask about; one sync per step is part of it
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - start
        return logits
