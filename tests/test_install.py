"""The package builds as a wheel that installs and imports from outside the repository."""

import json
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

from addertrain.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]

# Where the package's modules live in the checkout (pyproject's package-dir).
PACKAGE_DIRS = {
    "addertrain": "addertrain",
    "kernels": "addertrain.kernels",
    "launch": "addertrain.launch",
}


def source_modules(files: list[str]) -> set[str]:
    """Every module the tracked files define, by its installed name."""
    names = set()
    for name in files:
        path = Path(name)
        if path.suffix != ".py" or path.parts[0] not in PACKAGE_DIRS:
            continue
        parts = [PACKAGE_DIRS[path.parts[0]], *path.with_suffix("").parts[1:]]
        if parts[-1] == "__init__":
            parts.pop()
        names.add(".".join(parts))
    return names


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
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path / "dist"),
        str(src),
    )
    (wheel,) = (tmp_path / "dist").glob("addertrain-*.whl")

    # A fresh venv; the heavy dependencies come from this environment's site-packages via a
    # .pth line (no editable finder: .pth files inside that folder are not processed).
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    py = venv / "bin" / "python"
    site = run(
        str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    ).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel))

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    code = (
        "import importlib, json, pkgutil, addertrain\n"
        "names = [m.name for m in pkgutil.walk_packages(addertrain.__path__, 'addertrain.')]\n"
        "for m in names: importlib.import_module(m)\n"
        "print(json.dumps([addertrain.__file__, sorted(names)]))"
    )
    where, installed = json.loads(run(str(py), "-c", code, cwd=outside).stdout)
    assert where.startswith(site), where  # the installed copy, not the checkout
    # every module of the checkout is in the wheel and imports there
    assert set(installed) | {"addertrain"} == source_modules(files)
    helptext = run(str(venv / "bin" / "addertrain"), "--help", cwd=outside).stdout
    assert all(re.search(rf"^ +{group or name}\b", helptext, re.M) for group, name in COMMANDS), (
        helptext
    )
