"""``addertrain report``: one PNG and one table for one or more runs, read from their run
directories (``metrics.jsonl``, ``config.yaml``, ``result.json`` when the run has ended).

Works while a run is going (``metrics.read_records`` leaves out a record being written).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
from dataclasses import dataclass
from pathlib import Path

from addertrain.errors import UserError
from addertrain.metrics import read_records

HELP = (
    "draw runs side by side in one PNG (loss, top-1, lr, img/s, ALR scale per adder layer) "
    "and print their final metrics and op counts as a table"
)

METRICS = "metrics.jsonl"


def add_arguments(p) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories to overlay")
    p.add_argument(
        "--out",
        default="report.png",
        help="the PNG to write (default: report.png in the current directory)",
    )
    p.add_argument("--markdown", metavar="FILE", help="also write the table to FILE (markdown)")


@dataclass
class Run:
    path: Path
    name: str
    config: dict
    records: list[dict]
    result: dict | None
    status: str

    def kind(self, kind: str) -> list[dict]:
        return [r for r in self.records if r["kind"] == kind]


# -- reading ---------------------------------------------------------------------------------


def read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(
            f"cannot read {path}: {e}; move it away to report the run without it"
        ) from None


def read_config(path: Path) -> dict:
    """The run's resolved recipe as written by launch, unvalidated: a report of an older run
    must not fail on keys this version renamed."""
    import yaml

    if not path.exists():
        return {}
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(
            f"cannot read {path}: {e}; move it away to report the run without it"
        ) from None
    return tree if isinstance(tree, dict) else {}


def live(run_dir: Path) -> bool:
    """Whether the launch named in the run's lock file (addertrain.runlock) is alive on this
    host. Read only: taking the lock, even for a moment, could refuse a launch starting then."""
    try:
        holder = json.loads((run_dir / "launch.lock").read_text())
        pid, host = int(holder["pid"]), holder["host"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


def status(run_dir: Path, result: dict | None) -> str:
    if result is not None:
        return str(result.get("status", "ended"))
    if live(run_dir):
        return "running"
    return "unfinished"  # killed or crashed, or launched on another host


def load(path: str) -> Run:
    run_dir = Path(path)
    if not run_dir.exists():
        raise UserError(
            f"run directory {run_dir} does not exist; pass a folder that "
            f"`addertrain launch` wrote (it holds {METRICS})"
        )
    if not run_dir.is_dir():
        raise UserError(
            f"{run_dir} is a file, not a run directory; pass the folder that holds "
            f"{METRICS}" + (f" ({run_dir.parent})" if run_dir.name == METRICS else "")
        )
    if not (run_dir / METRICS).exists():
        raise UserError(
            f"{run_dir} has no {METRICS}: not a run directory, or its run has not "
            "logged a step yet (it logs every logging.interval_steps steps)"
        )
    records = read_records(run_dir / METRICS)
    if not records:
        raise UserError(
            f"{run_dir / METRICS} holds no records yet; run report again after the "
            "run's first logged step"
        )
    config = read_config(run_dir / "config.yaml")
    result = read_json(run_dir / "result.json")
    name = (config.get("run") or {}).get("name") or run_dir.resolve().name
    return Run(run_dir, str(name), config, records, result, status(run_dir, result))


def label(runs: list[Run]) -> None:
    """Two runs of the same name (the same recipe in two folders) are told apart by path."""
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = str(r.path)


# -- the table --------------------------------------------------------------------------------


def ops_cost(run: Run):
    """The op count of the run's own model, or None when its config does not say."""
    from addertrain import opcount
    from addertrain.models import ARCHS

    model, data = run.config.get("model") or {}, run.config.get("data") or {}
    if model.get("arch") not in ARCHS or model.get("conv") not in ("adder", "conv"):
        return None
    spec = opcount.ModelSpec(
        model["arch"],
        int(model.get("num_classes", 10)),
        int(data.get("image_size", 32)),
        int(data.get("channels", 3)),
    )
    return opcount.cost(spec, model["conv"])


def rows(runs: list[Run]) -> list[list[str]]:
    from addertrain import opcount, phases

    def pct(v):
        return "n/a" if v is None else f"{v:.2f}%"

    table = [["", *(r.name for r in runs)]]

    def row(title, values):
        table.append([title, *values])

    train = [r.kind("train") for r in runs]
    evals = [r.kind("eval") for r in runs]
    last_eval = [e[-1] if e else (r.result or {}).get("eval") or None for r, e in zip(runs, evals)]
    models = [r.config.get("model") or {} for r in runs]
    row("model", [f"{m.get('arch', '?')} {m.get('conv', '?')}" for m in models])
    row("status", [r.status for r in runs])
    row("steps", [str(max((x["step"] for x in r.records), default=0)) for r in runs])
    row(
        "images seen",
        [f"{t[-1]['images_seen']:,}" if t and "images_seen" in t[-1] else "-" for t in train],
    )
    row("final top-1", [pct(e["top1"]) if e else "-" for e in last_eval])
    row("final top-5", [pct(e["top5"]) if e else "-" for e in last_eval])
    row("final eval loss", [f"{e['loss']:.4f}" if e else "-" for e in last_eval])
    row("evaluated at step", [str(e[-1]["step"]) if e else "-" for e in evals])
    row("last train loss", [f"{t[-1]['loss']:.4f}" if t else "-" for t in train])
    row(
        "img/s (median)",
        [
            f"{statistics.median(x['img_per_s'] for x in t):.1f}"
            if t and all("img_per_s" in x for x in t)
            else "-"
            for t in train
        ],
    )
    row(
        "wall time",
        [f"{r.result['wall_s']:.0f} s" if r.result and "wall_s" in r.result else "-" for r in runs],
    )
    # where the wall time went (addertrain/phases.py), a row per phase any run recorded
    results = [r.result or {} for r in runs]
    for name in [*phases.ORDER, phases.UNTIMED]:
        if any(name in res.get("phases", {}) for res in results):
            row(
                f"phase {phases.LABELS.get(name, name)}",
                [
                    phases.describe(name, res["phases"][name], res.get("phase_counts", {}))
                    if name in res.get("phases", {})
                    else "-"
                    for res in results
                ],
            )
    costs = [ops_cost(r) for r in runs]
    row("#Mul / image", [opcount.human(c.mul) if c else "-" for c in costs])
    row("#Add / image", [opcount.human(c.add) if c else "-" for c in costs])
    row("energy / image", [opcount.energy(c.energy_pj) if c else "-" for c in costs])
    return table


def markdown(table: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]

    def line(r):
        return "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |"

    return "\n".join([line(table[0]), line(["-" * w for w in widths]), *map(line, table[1:])])


# -- the figure -------------------------------------------------------------------------------


def alr_series(run: Run) -> dict[str, tuple[list, list]]:
    """Per adder layer, (steps, ALR scales), in the model's layer order."""
    series: dict[str, tuple[list, list]] = {}
    for r in run.kind("train"):
        for layer, v in (r.get("alr_layers") or {}).items():
            steps, scales = series.setdefault(layer, ([], []))
            steps.append(r["step"])
            scales.append(v["scale"])
    return series


def marker(kind: str, points: int) -> str | None:
    """Evaluations, and lines of a few points (a run just started), show their points."""
    return "o" if kind == "eval" or points < 12 else None


def draw(runs: list[Run], table: list[list[str]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import cm
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    alr = [(r, s) for r in runs if (s := alr_series(r))]
    per_row = 4
    alr_rows = -(-len(alr) // per_row)
    heights = [3.2] + [3.2] * alr_rows + [0.28 * len(table) + 0.4]
    fig = plt.figure(figsize=(18, sum(heights) + 0.6))
    grid = fig.add_gridspec(len(heights), per_row, height_ratios=heights)
    colors = [f"C{i % 10}" for i in range(len(runs))]

    panels = (
        ("training loss", "train", "loss"),
        ("evaluation top-1 (%)", "eval", "top1"),
        ("learning rate", "train", "lr"),
        ("images/s", "train", "img_per_s"),
    )
    for col, (title, kind, key) in enumerate(panels):
        ax = fig.add_subplot(grid[0, col])
        for run, color in zip(runs, colors):
            pts = [(r["step"], r[key]) for r in run.kind(kind) if r.get(key) is not None]
            if pts:
                ax.plot(
                    *zip(*pts),
                    marker=marker(kind, len(pts)),
                    color=color,
                    label=run.name,
                    markersize=3,
                )
        ax.set(title=title, xlabel="step")
        if col == 0:
            ax.legend(fontsize=8)

    for i, (run, series) in enumerate(alr):
        ax = fig.add_subplot(grid[1 + i // per_row, i % per_row])
        norm = Normalize(0, max(1, len(series) - 1))
        for j, (steps, scales) in enumerate(series.values()):
            ax.plot(
                steps,
                scales,
                marker=marker("train", len(steps)),
                markersize=2,
                color=cm.viridis(norm(j)),
                linewidth=1,
            )
        ax.set(
            title=f"{run.name}: ALR scale, {len(series)} adder layers", xlabel="step", yscale="log"
        )
        bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax)
        bar.locator = MaxNLocator(integer=True)
        bar.update_ticks()
        bar.set_label("adder layer (input to output)", fontsize=8)

    ax = fig.add_subplot(grid[-1, :])
    ax.axis("off")
    ax.table(cellText=table[1:], colLabels=table[0], loc="center", cellLoc="left").scale(1, 1.2)
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=90)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        plt.close(fig)


def check_output(path: Path, suffix: str | None) -> None:
    if suffix and path.suffix.lower() != suffix:
        raise UserError(f"--out {path} must name a {suffix} file")
    if path.is_dir():
        raise UserError(f"{path} is a directory; name a file to write")
    if not path.parent.is_dir():
        raise UserError(
            f"cannot write {path}: folder {path.parent} does not exist; create it first"
        )


def run(args) -> int:
    out = Path(args.out)
    check_output(out, ".png")
    if args.markdown:
        check_output(Path(args.markdown), None)
    runs = [load(p) for p in args.runs]
    label(runs)
    table = rows(runs)
    text = markdown(table)
    draw(runs, table, out)
    if args.markdown:
        try:
            Path(args.markdown).write_text(text + "\n")
        except OSError as e:
            raise UserError(f"cannot write {args.markdown}: {e.strerror or e}") from None
    print(text)
    print(f"\nwrote {out}" + (f" and {args.markdown}" if args.markdown else ""))
    return 0
