"""Carry wheels to the lent GPU machine in parts: one device call transfers at most 64 MiB
(the working tree included), and DALI's and Ray's wheels are larger than that.

    here:   python scripts/wheels.py download                  (into .whl/: cp312, x86-64)
            python scripts/wheels.py split .whl .whl-parts     (parts + manifest, in bundles)
    there:  python3 scripts/wheels.py receive .whl-parts/bundle-01 /tmp/addertrain-wheel-parts
            ... one device call per bundle, back to back while the machine is held ...
            python3 scripts/wheels.py install /tmp/addertrain-wheel-parts --target SITE

``receive`` checks the bundle's parts against the manifest and moves them to a folder outside
the checkout, which stays on the machine while it is held; ``install`` rebuilds every file,
checks its sha256 and installs the wheels with pip, offline. A missing or corrupted part is
an error that names the part and the bundle to send again (exit code 2). Standard library
only: it runs on the GPU machine before anything is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

MIB = 1 << 20
MANIFEST = "manifest.json"
CHUNK = 4 * MIB

# What the GPU machine (Python 3.12, torch 2.11 with CUDA 13, no network) lacks beyond the
# deepspeed and pydantic wheels that scripts/fetch_gpu_wheels.sh makes. Versions follow this
# checkout's .venv (the CPU twin of each CUDA 13 package where the venv has the CUDA 12 one),
# so both machines run the same code.
FROM_VENV = [
    # Ray, and what its core and its train extra import that the GPU image does not hold
    "ray",
    "jsonschema",
    "jsonschema-specifications",
    "referencing",
    "rpds-py",
    "tensorboardX",
    # pyproject's pytest options run the tests in parallel processes (gpu_check.sh: -n 0)
    "pytest-xdist",
    "execnet",
    # DALI's Python dependencies missing there
    "astunparse",
    "gast",
    "optree",
    "nvtx",
    "makefun",
    "libcst",
]
# name on the GPU machine -> the venv's package whose version it takes
CUDA13_TWIN = {
    "nvidia-dali-cuda130": "nvidia-dali-cuda120",
    "nvidia-nvimgcodec-cu13": "nvidia-nvimgcodec-cu12",
    "nvidia-libnvcomp-cu13": "nvidia-libnvcomp-cu12",
    "nvidia-nvjpeg2k-cu13": "nvidia-nvjpeg2k-cu12",
    "nvidia-nvtiff-cu13": "nvidia-nvtiff-cu12",
}
# The CUDA 13 nvJPEG is one package without a suffix (nvimgcodec-cu13's "nvjpeg" extra);
# the venv's CUDA 12 one has another version line, so it is pinned here.
PINNED = ["nvidia-nvjpeg==13.3.2.43"]
# Ray, DeepSpeed and what they need: sent first, so that the first two device calls can
# already run the Ray + DeepSpeed path on synthetic data if DALI's bundles cannot follow.
CORE_FIRST = (
    "ray-*",
    "deepspeed-*",
    "pydantic*",
    "annotated_types-*",
    "typing_*",
    "hjson-*",
    "jsonschema*",
    "referencing-*",
    "rpds_py-*",
    "tensorboardx-*",
    "safetensors-*",
)
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"] + [
    arg
    for tag in (
        "manylinux_2_34_x86_64",
        "manylinux_2_28_x86_64",
        "manylinux_2_27_x86_64",
        "manylinux_2_24_x86_64",
        "manylinux_2_17_x86_64",
        "manylinux2014_x86_64",
        "manylinux1_x86_64",
    )
    for arg in ("--platform", tag)
]


class WheelError(Exception):
    """Bad input or a broken transfer: one message, exit code 2."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def venv_version(python: str, name: str) -> str:
    out = subprocess.run([python, "-m", "pip", "show", name], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("Version: "):
            return line.split(": ", 1)[1]
    raise WheelError(f"{name} is not installed in {python}'s environment; run scripts/setup.sh")


def download(python: str) -> None:
    root = Path(__file__).resolve().parents[1]
    dest = root / ".whl"
    # fetch_gpu_wheels.sh empties .whl/ and builds deepspeed there; the rest joins it
    subprocess.run(
        ["bash", str(root / "scripts" / "fetch_gpu_wheels.sh")],
        check=True,
        cwd=root,
        env={**os.environ, "VENV_PY": python},
    )
    specs = [f"{n}=={venv_version(python, n)}" for n in FROM_VENV]
    specs += [f"{n}=={venv_version(python, twin)}" for n, twin in CUDA13_TWIN.items()]
    subprocess.run(
        [
            python,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            *PLATFORM,
            "-d",
            str(dest),
            *specs,
            *PINNED,
        ],
        check=True,
    )
    files = sorted(dest.glob("*.whl"), key=lambda p: -p.stat().st_size)
    for p in files:
        print(f"{p.stat().st_size / MIB:9.1f} MiB  {p.name}")
    print(f"{sum(p.stat().st_size for p in files) / MIB:9.1f} MiB  total, {len(files)} wheels")


def split(
    src: Path, out: Path, part_mib: float, bundle_mib: float, first: tuple[str, ...] = ()
) -> dict:
    """Cut every wheel in ``src`` into parts of at most ``part_mib`` and put each part into the
    first bundle of at most ``bundle_mib`` with room for it (first fit: each bundle is one
    device call, so few and full bundles). Wheels matching a ``first`` glob come first, so
    the bundles sent first complete them; then largest first."""
    if part_mib > bundle_mib:
        raise WheelError(
            f"--part-mib {part_mib} is larger than --bundle-mib {bundle_mib}: "
            "a part must fit in one bundle"
        )
    files = sorted(
        src.glob("*.whl"),
        key=lambda p: (not any(p.match(g) for g in first), -p.stat().st_size, p.name),
    )
    if not files:
        raise WheelError(f"{src} holds no .whl files; fill .whl/ with `wheels.py download`")
    if out.exists():
        strangers = [p.name for p in out.iterdir() if not p.name.startswith("bundle-")]
        if strangers:
            raise WheelError(
                f"{out} holds other files than bundles ({strangers[0]}, ...): "
                "name an empty or earlier split's folder"
            )
        shutil.rmtree(out)
    part_bytes, limit = int(part_mib * MIB), int(bundle_mib * MIB)
    manifest: dict = {"part_bytes": part_bytes, "bundle_bytes": limit, "files": []}
    used: list[int] = []  # bytes in each bundle so far
    for path in files:
        entry = {
            "name": path.name,
            "bytes": path.stat().st_size,
            "sha256": sha256(path),
            "parts": [],
        }
        with path.open("rb") as f:
            index = 0
            while data := f.read(part_bytes):
                bundle = next((b for b, n in enumerate(used) if n + len(data) <= limit), None)
                if bundle is None:
                    bundle = len(used)
                    used.append(0)
                used[bundle] += len(data)
                name = f"{path.name}.part{index:03d}"
                folder = out / f"bundle-{bundle + 1:02d}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(data)
                entry["parts"].append(
                    {
                        "name": name,
                        "bytes": len(data),
                        "bundle": folder.name,
                        "sha256": hashlib.sha256(data).hexdigest(),
                    }
                )
                index += 1
        manifest["files"].append(entry)
    text = json.dumps(manifest, indent=1)
    for folder in sorted(out.iterdir()):
        (folder / MANIFEST).write_text(text)
        size = sum(p.stat().st_size for p in folder.iterdir())
        print(f"{folder.name}: {size / MIB:6.1f} MiB, {len(list(folder.iterdir())) - 1} parts")
    return manifest


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise WheelError(
            f"{path} is missing: send a bundle made by `wheels.py split` "
            "(each bundle carries the manifest)"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WheelError(f"{path} is not valid JSON ({e}); make the bundles again") from e


def parts(manifest: dict):
    for entry in manifest["files"]:
        for part in entry["parts"]:
            yield entry, part


def check_part(path: Path, part: dict) -> None:
    if not path.is_file():
        raise WheelError(
            f"part {part['name']} is missing from {path.parent}: send {part['bundle']} again"
        )
    if path.stat().st_size != part["bytes"] or sha256(path) != part["sha256"]:
        raise WheelError(
            f"part {part['name']} in {path.parent} is corrupted (size or sha256 "
            f"differs from the manifest): send {part['bundle']} again"
        )


def receive(bundle: Path, store: Path) -> None:
    manifest = read_manifest(bundle)
    store.mkdir(parents=True, exist_ok=True)
    old = store / MANIFEST
    if old.is_file() and json.loads(old.read_text()) != manifest:
        raise WheelError(
            f"{bundle} comes from another split than the parts in {store}; "
            f"remove {store} and send every bundle of one split"
        )
    mine = [part for _, part in parts(manifest) if part["bundle"] == bundle.name]
    for part in mine:
        check_part(bundle / part["name"], part)
    for part in mine:
        shutil.move(str(bundle / part["name"]), store / part["name"])
    shutil.copy(bundle / MANIFEST, old)
    have = sum(1 for _, part in parts(manifest) if (store / part["name"]).is_file())
    total = sum(1 for _ in parts(manifest))
    print(f"received {bundle.name}: {len(mine)} parts; {store} holds {have} of {total}")


def assemble(store: Path, dest: Path, complete_only: bool = False) -> list[Path]:
    """Rebuild the files whose parts are in ``store``: all of them, or with ``complete_only``
    those with every part there (the others are listed)."""
    manifest = read_manifest(store)
    entries = manifest["files"]
    if complete_only:
        ready = [e for e in entries if all((store / p["name"]).is_file() for p in e["parts"])]
        for e in entries:
            if e not in ready:
                print(f"not complete, left out: {e['name']}")
        entries = ready
    for entry in entries:  # every problem before any work, naming what to resend
        for part in entry["parts"]:
            check_part(store / part["name"], part)
    dest.mkdir(parents=True, exist_ok=True)
    built = []
    for entry in entries:
        target = dest / entry["name"]
        with target.open("wb") as f:
            for part in entry["parts"]:
                with (store / part["name"]).open("rb") as src:
                    shutil.copyfileobj(src, f, CHUNK)
        if sha256(target) != entry["sha256"]:
            target.unlink()
            raise WheelError(
                f"{entry['name']} rebuilt from its parts has the wrong sha256; "
                "make the bundles again and send them all"
            )
        built.append(target)
    print(f"assembled {len(built)} files in {dest}, each sha256 as in the manifest")
    return built


def install(store: Path, target: str, complete_only: bool) -> None:
    wheels = assemble(store, store / "wheels", complete_only)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-cache-dir",
            "--upgrade",
            "--target",
            target,
            *map(str, wheels),
        ],
        check=True,
    )
    print(f"installed {len(wheels)} wheels into {target}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="wheels.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="fill .whl/ with the GPU machine's missing wheels")
    d.add_argument("--python", default=".venv/bin/python", help="the venv whose versions to use")
    s = sub.add_parser("split", help="cut wheels into parts and bundles with a manifest")
    s.add_argument("src", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("--part-mib", type=float, default=58)
    s.add_argument(
        "--bundle-mib",
        type=float,
        default=58,
        help="per device call; the checkout (about 1 MiB) travels with it",
    )
    s.add_argument(
        "--first",
        action="append",
        metavar="GLOB",
        help="wheels to put in the first bundles (repeatable; default: Ray's and DeepSpeed's)",
    )
    r = sub.add_parser("receive", help="check a bundle's parts and move them to the store")
    r.add_argument("bundle", type=Path)
    r.add_argument("store", type=Path)
    a = sub.add_parser("assemble", help="rebuild and verify every file from the store")
    a.add_argument("store", type=Path)
    a.add_argument("dest", type=Path)
    i = sub.add_parser("install", help="assemble, then pip install offline into --target")
    i.add_argument("store", type=Path)
    i.add_argument("--target", required=True)
    i.add_argument(
        "--complete-only",
        action="store_true",
        help="install the wheels whose parts all arrived, list the others",
    )
    args = p.parse_args(argv)
    try:
        if args.command == "download":
            download(args.python)
        elif args.command == "split":
            split(
                args.src, args.out, args.part_mib, args.bundle_mib, tuple(args.first or CORE_FIRST)
            )
        elif args.command == "receive":
            receive(args.bundle, args.store)
        elif args.command == "assemble":
            assemble(args.store, args.dest)
        else:
            install(args.store, args.target, args.complete_only)
    except WheelError as e:
        print(f"wheels.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
