"""The prepared GPU run, on this CPU: wheels split into parts, sent, reassembled, verified and
installed offline (scripts/wheels.py), and scripts/gpu_check.sh's fake-ImageNet launch through
Ray + CPU DALI + the Triton interpreter with a SIGTERM and a resume (scripts/fullstack.py)."""

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "scripts" / "wheels.py"
KIB = 1024


def wheels(*args):
    return subprocess.run(
        [sys.executable, str(WHEELS), *map(str, args)], capture_output=True, text=True, timeout=120
    )


def digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(folder: Path, name: str, payload: bytes) -> Path:
    """A minimal valid py3-none-any wheel whose module holds ``payload`` (so its size and
    content are chosen by the test)."""
    dist = f"{name}-1.0"
    files = {
        f"{name}.py": b"DATA = " + repr(payload).encode() + b"\n",
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\n"
        f"Version: 1.0\n".encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},sha256={digest(data)},{len(data)}\n" for path, data in files.items())
    files[f"{dist}.dist-info/RECORD"] = (record + f"{dist}.dist-info/RECORD,,\n").encode()
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for arcname, data in files.items():
            z.writestr(arcname, data)
    return path


@pytest.fixture
def split(tmp_path):
    """Three wheels (two larger than a part) cut into 8 KiB parts in bundles of 20 KiB."""
    src = tmp_path / "whl"
    src.mkdir()
    for i, size in enumerate((30 * KIB, 9 * KIB, 500)):
        make_wheel(src, f"carried{i}", os.urandom(size))
    out = wheels(
        "split", src, tmp_path / "parts", "--part-mib", 8 / 1024, "--bundle-mib", 20 / 1024
    )
    assert out.returncode == 0, out.stderr
    return src, tmp_path / "parts"


def test_parts_respect_the_limits_and_the_manifest_describes_them(split):
    src, parts = split
    bundles = sorted(parts.iterdir())
    manifest = json.loads((bundles[0] / "manifest.json").read_text())
    assert [f["name"] for f in manifest["files"]] == sorted(
        (p.name for p in src.iterdir()), key=lambda n: -(src / n).stat().st_size
    )
    for folder in bundles:
        assert json.loads((folder / "manifest.json").read_text()) == manifest
        sizes = [p.stat().st_size for p in folder.iterdir() if p.name != "manifest.json"]
        assert sum(sizes) <= 20 * KIB and max(sizes) <= 8 * KIB
    for entry in manifest["files"]:
        whole = b"".join((parts / p["bundle"] / p["name"]).read_bytes() for p in entry["parts"])
        assert whole == (src / entry["name"]).read_bytes()
        assert hashlib.sha256(whole).hexdigest() == entry["sha256"]
    sizes = [f["bytes"] for f in manifest["files"]]
    assert sum(len(f["parts"]) for f in manifest["files"]) == sum(-(-n // (8 * KIB)) for n in sizes)
    # first fit leaves no two bundles that could have been one
    loads = sorted(
        sum(p.stat().st_size for p in b.iterdir() if p.name != "manifest.json") for b in bundles
    )
    assert len(bundles) < 2 or loads[0] + loads[1] > 20 * KIB


def test_bundles_received_one_call_at_a_time_reassemble_and_install(split, tmp_path):
    src, parts = split
    store, target = tmp_path / "store", tmp_path / "site"
    for bundle in sorted(parts.iterdir()):
        out = wheels("receive", bundle, store)
        assert out.returncode == 0, out.stderr
    parts_sent = len(list(store.glob("*.part*")))
    assert parts_sent > 3 and f"holds {parts_sent} of {parts_sent}" in out.stdout
    out = wheels("install", store, "--target", target)
    assert out.returncode == 0, out.stderr
    for wheel in src.iterdir():
        assert (store / "wheels" / wheel.name).read_bytes() == wheel.read_bytes()
    code = "import carried0, carried2; print(len(carried0.DATA), len(carried2.DATA))"
    run = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(target)},
    )
    assert run.stdout.split() == [str(30 * KIB), "500"], run.stderr


def received(parts: Path, store: Path) -> None:
    for bundle in sorted(parts.iterdir()):
        assert wheels("receive", bundle, store).returncode == 0


def test_a_missing_part_names_the_bundle_to_send_again(split, tmp_path):
    _, parts = split
    store = tmp_path / "store"
    received(parts, store)
    manifest = json.loads((store / "manifest.json").read_text())
    lost = manifest["files"][0]["parts"][1]
    (store / lost["name"]).unlink()
    out = wheels("assemble", store, tmp_path / "built")
    assert out.returncode == 2
    assert f"part {lost['name']} is missing" in out.stderr
    assert f"send {lost['bundle']} again" in out.stderr
    assert "Traceback" not in out.stderr
    assert not list(tmp_path.glob("built/*.whl"))


def test_a_corrupted_part_is_refused_on_receipt_and_on_assembly(split, tmp_path):
    _, parts = split
    first = sorted(parts.iterdir())[0]
    part = next(p for p in first.iterdir() if p.name != "manifest.json")
    data = bytearray(part.read_bytes())
    data[100] ^= 1
    part.write_bytes(bytes(data))
    out = wheels("receive", first, tmp_path / "store")
    assert out.returncode == 2
    assert f"part {part.name} in {first} is corrupted" in out.stderr
    assert f"send {first.name} again" in out.stderr
    # corrupted after receipt (in the store): assembly finds it before writing anything
    shutil.rmtree(parts)
    src = tmp_path / "whl"
    assert (
        wheels("split", src, parts, "--part-mib", 8 / 1024, "--bundle-mib", 20 / 1024).returncode
        == 0
    )
    store = tmp_path / "store2"
    received(parts, store)
    stored = sorted(store.glob("*.part*"))[0]
    stored.write_bytes(stored.read_bytes()[:-1])
    out = wheels("assemble", store, tmp_path / "built")
    assert out.returncode == 2 and f"part {stored.name}" in out.stderr
    assert "corrupted" in out.stderr


def test_bundles_of_two_splits_are_not_mixed(split, tmp_path):
    src, parts = split
    store = tmp_path / "store"
    assert wheels("receive", sorted(parts.iterdir())[0], store).returncode == 0
    make_wheel(src, "another", os.urandom(2 * KIB))
    assert (
        wheels(
            "split", src, tmp_path / "parts2", "--part-mib", 8 / 1024, "--bundle-mib", 20 / 1024
        ).returncode
        == 0
    )
    out = wheels("receive", sorted((tmp_path / "parts2").iterdir())[1], store)
    assert out.returncode == 2 and "comes from another split" in out.stderr


def test_split_never_empties_a_folder_that_is_not_a_split(split, tmp_path):
    src, _ = split
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    out = wheels("split", src, tmp_path / "notes")
    assert out.returncode == 2 and "holds other files than bundles (keep.txt" in out.stderr
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


def test_a_part_larger_than_a_bundle_is_refused(tmp_path):
    (tmp_path / "whl").mkdir()
    make_wheel(tmp_path / "whl", "x", b"1")
    out = wheels(
        "split", tmp_path / "whl", tmp_path / "parts", "--part-mib", "2", "--bundle-mib", "1"
    )
    assert out.returncode == 2 and "--part-mib 2.0 is larger than --bundle-mib 1.0" in out.stderr


def test_the_wheel_folders_are_git_ignored():
    out = subprocess.run(
        ["git", "check-ignore", ".whl/x.whl", ".whl-parts/bundle-01/x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.stdout.split() == [".whl/x.whl", ".whl-parts/bundle-01/x"]


def test_the_gpu_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")]).returncode == 0


@pytest.mark.slow
def test_fake_imagenet_launch_through_ray_dali_and_triton_resumes_after_sigterm(tmp_path):
    """gpu_check.sh's data and fullstack sections at CPU size: ResNet-20 at 8 px, batch 2, on a
    generated ImageNet-format folder, the Ray executor, CPU DALI, the Triton interpreter and
    DeepSpeed on gloo; SIGTERM after step 1, a relaunch, 3 steps in all."""
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "OUT": str(out),
        "GPU_CHECK_WORK": str(tmp_path / "work"),
        "GPU_CHECK_ONLY": "data fullstack",
        "GPU_CHECK_TOTAL_S": "1100",
    }
    run = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    log = (out / "gpu_check.log").read_text()
    summary = (out / "summary.txt").read_text()
    assert "data               exit 0" in summary, log[-4000:]
    assert "fullstack          exit 0" in summary, log[-4000:]
    assert run.returncode == 0
    result = json.loads((out / "fullstack.json").read_text())
    assert all(result["checks"].values()), result["checks"]
    assert result["exit_codes"] == [75, 0]
    assert 1 <= result["resumed_at"] < 3
    assert result["resumed_at"] == result["checkpointed_at"]
    assert [e["step"] for e in result["evaluations"]] == [3]
    assert result["img_per_s_real"]["steps"] >= 1
    assert result["launch_to_first_step_s"]["cold"] > 0
    assert "0 errors" in log
    assert result["rank0"]["gpus"] == 0


def test_first_wheels_complete_in_the_first_bundles_and_install_alone(split, tmp_path):
    src, _ = split
    parts = tmp_path / "first"
    out = wheels(
        "split",
        src,
        parts,
        "--part-mib",
        8 / 1024,
        "--bundle-mib",
        20 / 1024,
        "--first",
        "carried2-*",
    )
    assert out.returncode == 0, out.stderr
    manifest = json.loads((parts / "bundle-01" / "manifest.json").read_text())
    assert manifest["files"][0]["name"].startswith("carried2-")
    assert {p["bundle"] for p in manifest["files"][0]["parts"]} == {"bundle-01"}
    store = tmp_path / "store"
    assert wheels("receive", parts / "bundle-01", store).returncode == 0
    assert wheels("install", store, "--target", tmp_path / "site").returncode == 2
    out = wheels("install", store, "--target", tmp_path / "site", "--complete-only")
    assert out.returncode == 0, out.stderr
    assert "not complete, left out: carried0-1.0-py3-none-any.whl" in out.stdout
    assert [p.name for p in (tmp_path / "site").glob("carried*.py")] == ["carried2.py"]
