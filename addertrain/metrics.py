"""Rank-0 progress lines (rate, ETA), metrics as JSON lines, and plots of them."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from addertrain.console import LOG
from addertrain.errors import UserError


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def eval_line(result: dict) -> str:
    """``top-1 98.61%  top-5 99.90%  loss 0.0633`` (top-5 n/a for 5 classes or fewer)."""
    top5 = "n/a" if result["top5"] is None else f"{result['top5']:.2f}%"
    return f"top-1 {result['top1']:.2f}%  top-5 {top5}  loss {result['loss']:.4f}"


def scalars(values: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a (nested) record as flat ``a/b`` names."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, also while its run is writing it: a last line without
    its newline is a record being written and is left out; any other line that is not a
    record is damage, named by its line number."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    records = []
    for number, line in enumerate(text.split("\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{path} line {number} is not a JSON record ({e.msg}); the file is "
                "damaged: delete that line and run again"
            ) from None
        if not isinstance(record, dict) or "kind" not in record or "step" not in record:
            raise UserError(
                f"{path} line {number} is not a metrics record (no kind and step); "
                "delete that line and run again"
            )
        records.append(record)
    return records


class MetricsLog:
    """Appends one JSON object per line to ``run_dir/metrics.jsonl`` and, with
    ``tensorboard``, the same numbers to TensorBoard event files in ``run_dir/tensorboard``
    (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = False):
        self.path = run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.tensorboard = enabled and tensorboard
        self._writer = None
        self._purge_step = None

    def write(self, kind: str, **values) -> None:
        if not self.enabled:
            return
        line = (json.dumps({"kind": kind, "time": time.time(), **values}) + "\n").encode()
        # one write() per record: a buffered file splits records longer than its buffer into
        # several, and a kill between them leaves half a record for the resumed run to append to
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        if self.tensorboard:
            writer = self._tensorboard()
            for name, value in scalars({k: v for k, v in values.items() if k != "step"}).items():
                writer.add_scalar(f"{kind}/{name}", value, values["step"])

    def _tensorboard(self):
        if self._writer is None:
            from tensorboardX import SummaryWriter

            # after a resume, TensorBoard drops what the interrupted run logged past the
            # checkpoint, as forget_after() does for the JSON lines
            self._writer = SummaryWriter(
                str(self.path.parent / "tensorboard"), purge_step=self._purge_step
            )
        return self._writer

    def forget_after(self, step: int) -> None:
        """Drop what an interrupted run logged past ``step``: those steps run again."""
        kept = [r for r in self.read() if r["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        self._purge_step = step + 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return read_records(self.path)


class Progress:
    """Prints ``step/total | loss | lr | img/s | ETA`` lines; rate and ETA cover the last
    interval."""

    def __init__(self, total_steps: int, enabled: bool):
        self.total, self.enabled = total_steps, enabled
        self.mark(0, 0)

    def mark(self, step: int, images: int) -> None:
        """Start the next interval here (after a resume or an evaluation pause)."""
        self.last = (time.perf_counter(), step, images)

    def update(self, step: int, images: int, **fields) -> float:
        """Print a line; returns images/s over the interval since the last mark."""
        now = time.perf_counter()
        t0, s0, i0 = self.last
        dt = max(now - t0, 1e-9)
        rate = (images - i0) / dt
        eta = (self.total - step) * dt / max(1, step - s0)
        self.mark(step, images)
        if self.enabled:
            parts = [f"step {step}/{self.total}"] + [
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()
            ]
            parts += [f"{rate:.1f} img/s", f"ETA {_hms(eta)}"]
            LOG.info(" | ".join(parts))
        return rate


def plot(records: list[dict], out: Path) -> Path | None:
    """Training loss, learning rate and evaluation accuracy against the step, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    if not train:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train])
    axes[0].set(title="training loss", xlabel="step")
    axes[1].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[1].set(title="learning rate", xlabel="step")
    if evals:
        axes[2].plot([r["step"] for r in evals], [r["top1"] for r in evals], "o-", label="top-1")
        if evals[0]["top5"] is not None:
            axes[2].plot(
                [r["step"] for r in evals], [r["top5"] for r in evals], "s-", label="top-5"
            )
        axes[2].legend()
    axes[2].set(title="evaluation accuracy (%)", xlabel="step")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
