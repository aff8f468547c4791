"""The package builds as a wheel that installs and imports from outside the repository."""

import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODULES = [
    "addertrain", "addertrain.cli", "addertrain.config", "addertrain.alr", "addertrain.trainer",
    "addertrain.worker", "addertrain.smoke", "addertrain.engine", "addertrain.distributed",
    "addertrain.metrics", "addertrain.schedule", "addertrain.models", "addertrain.nn",
    "addertrain.ops.reference", "addertrain.ops.unfold", "addertrain.data",
    "addertrain.data.synthetic", "addertrain.data.dali", "addertrain.data.check",
    "addertrain.data.digits", "addertrain.data.fake", "addertrain.bench.op",
    "addertrain.bench.kernels", "addertrain.bench.data", "addertrain.kernels",
    "addertrain.launch.command", "addertrain.launch.local", "addertrain.launch.ray_executor",
]


def run(*cmd, cwd=None):
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    return out


def test_wheel_installs_into_a_fresh_venv_and_imports_everything(tmp_path):
    # Build from the tracked files only, so a file missing from git fails here too.
    src = tmp_path / "src"
    files = run("git", "ls-files", cwd=ROOT).stdout.split()
    for name in files:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes((ROOT / name).read_bytes())
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
        "-w", str(tmp_path / "dist"), str(src))
    (wheel,) = (tmp_path / "dist").glob("addertrain-*.whl")

    # A fresh venv; the heavy dependencies come from this environment's site-packages via a
    # .pth line (no editable finder: .pth files inside that folder are not processed).
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    py = venv / "bin" / "python"
    site = run(str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel))

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    code = ("import importlib, addertrain\n"
            f"for m in {MODULES!r}: importlib.import_module(m)\n"
            "print(addertrain.__file__)")
    where = run(str(py), "-c", code, cwd=outside).stdout.strip()
    assert where.startswith(site), where  # the installed copy, not the checkout
    helptext = run(str(venv / "bin" / "addertrain"), "--help", cwd=outside).stdout
    assert "launch" in helptext and "bench" in helptext
