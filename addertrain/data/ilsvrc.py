"""The ILSVRC2012 downloads as users have them: ``ILSVRC2012_img_train.tar`` (a tar of
per-class tars ``<wnid>.tar``), ``ILSVRC2012_img_val.tar`` (flat), and the validation labels
from the devkit (``ILSVRC2012_devkit_t12.tar.gz``) or Kaggle's ``LOC_val_solution.csv``.

The tars are never unpacked: a scan reads their headers (seeking past the data) and records
where each JPEG's bytes lie in the tar file, so the packer's workers read them by offset.
The devkit's ILSVRC2012_ID labels follow ``meta.mat`` order, not the sorted wnids that are
the class ids everywhere in addertrain; :func:`devkit_labels` maps them.
"""

from __future__ import annotations

import csv
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from addertrain.errors import UserError

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEVKIT = "ILSVRC2012_devkit_t12.tar.gz"
KAGGLE = "LOC_val_solution.csv"
SOI = b"\xff\xd8\xff"


@dataclass(frozen=True)
class Member:
    """A JPEG inside a source file: ``size`` bytes at ``offset`` of ``path``."""

    name: str  # file name, e.g. n01440764_10026.JPEG
    group: str  # the class folder / per-class tar it came from ("" when flat)
    path: str
    offset: int
    size: int


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:")  # seekable: member data is skipped, not read
    except (OSError, tarfile.TarError) as e:
        raise UserError(
            f"cannot read {path} as an uncompressed tar ({e}); pass the ILSVRC2012 download "
            "as it came (re-download it if it is damaged)"
        ) from None


def _check_jpeg(fd: int, m: Member) -> None:
    if os.pread(fd, 3, m.offset) != SOI:
        where = f"{m.group}.tar/" if m.group else ""
        raise UserError(
            f"{m.path}: member {where}{m.name} is not a JPEG (no FF D8 FF marker); remove it "
            "from the tar or re-download the file"
        )


def scan_train_tar(path: Path) -> list[Member]:
    """Every JPEG of the train tar (a tar of ``<wnid>.tar``), with its byte range."""
    members = []
    fd = os.open(path, os.O_RDONLY)
    try:
        with _open_tar(path) as outer:
            for cls in outer:
                if not cls.isfile():
                    continue
                if not cls.name.endswith(".tar"):
                    raise UserError(
                        f"{path}: member {cls.name} is not a per-class <wnid>.tar; pass the "
                        f"{TRAIN_TAR} download as it came"
                    )
                wnid = Path(cls.name).stem
                try:
                    inner = tarfile.open(fileobj=outer.extractfile(cls), mode="r:")
                except tarfile.TarError as e:
                    raise UserError(
                        f"{path}: {cls.name} is not a tar ({e}); re-download it"
                    ) from None
                with inner:
                    for m in inner:
                        if m.isfile():
                            member = Member(
                                m.name, wnid, str(path), cls.offset_data + m.offset_data, m.size
                            )
                            _check_jpeg(fd, member)
                            members.append(member)
    finally:
        os.close(fd)
    return members


def scan_val_tar(path: Path) -> list[Member]:
    """Every JPEG of the flat val tar, sorted by name, with its byte range."""
    fd = os.open(path, os.O_RDONLY)
    try:
        with _open_tar(path) as tar:
            members = [
                Member(Path(m.name).name, "", str(path), m.offset_data, m.size)
                for m in tar
                if m.isfile()
            ]
        for m in members:
            _check_jpeg(fd, m)
    finally:
        os.close(fd)
    return sorted(members, key=lambda m: m.name)


def _devkit_file(tar: tarfile.TarFile, devkit: Path, suffix: str) -> bytes:
    for m in tar:
        if m.isfile() and m.name.endswith(suffix):
            return tar.extractfile(m).read()
    raise UserError(f"{devkit} holds no {suffix}; pass the ILSVRC2012 devkit ({DEVKIT})")


def devkit_labels(devkit: Path, names: list[str], classes: list[str]) -> list[str]:
    """The wnid of each validation image ``names`` (sorted file names), from the devkit's
    ground truth (one ILSVRC2012_ID per image in file-name order) and ``meta.mat`` (which
    wnid each ID is)."""
    import scipy.io

    try:
        with tarfile.open(devkit) as tar:
            meta = _devkit_file(tar, devkit, "data/meta.mat")
        with tarfile.open(devkit) as tar:
            truth = _devkit_file(tar, devkit, "data/ILSVRC2012_validation_ground_truth.txt")
        synsets = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
        wnids = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
        ids = [int(x) for x in truth.decode().split()]
    except (OSError, tarfile.TarError, KeyError, ValueError, TypeError) as e:
        raise UserError(
            f"cannot read the devkit {devkit} ({type(e).__name__}: {e}); pass {DEVKIT} as it came"
        ) from None
    if len(ids) != len(names):
        raise UserError(
            f"devkit {devkit} has ground truth for {len(ids)} validation images but the "
            f"validation set has {len(names)}; pass the devkit that belongs to these images"
        )
    known = set(classes)
    bad = [i for i in ids if wnids.get(i) not in known]
    if bad:
        raise UserError(
            f"devkit {devkit} labels validation images with ILSVRC2012_ID {bad[0]} "
            f"({wnids.get(bad[0], 'not in meta.mat')}), which is not a training class "
            f"({len(bad)} such labels); pass the devkit that belongs to these images"
        )
    return [wnids[i] for i in ids]


def list_labels(path: Path, names: list[str], classes: list[str]) -> list[str]:
    """The class of each validation image ``names`` from a label file: Kaggle's
    ``LOC_val_solution.csv`` (ImageId,PredictionString whose first token is the wnid) or a
    text file of ``filename label`` lines, the label a wnid or an index into the sorted wnids."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the label file {path} ({e})") from None
    found: dict[str, str] = {}
    if path.suffix.lower() == ".csv":
        for n, row in enumerate(csv.reader(io.StringIO(text)), 1):
            if n == 1 and row[:1] == ["ImageId"]:
                continue
            if len(row) < 2 or not row[1].split():
                raise UserError(f"{path}:{n}: expected 'ImageId,wnid ...', got {','.join(row)!r}")
            found[row[0]] = row[1].split()[0]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise UserError(f"{path}:{n}: expected 'filename label', got {line!r}")
            label = fields[1]
            if label.isdecimal():
                if int(label) >= len(classes):
                    raise UserError(
                        f"{path}:{n}: label {label} but there are {len(classes)} classes; "
                        "numeric labels index the sorted wnids (0-based)"
                    )
                label = classes[int(label)]
            found[Path(fields[0]).name] = label
    labels = []
    for name in names:
        label = found.get(name, found.get(Path(name).stem))
        if label is None:
            raise UserError(f"label file {path} has no label for {name}; list every image")
        labels.append(label)
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise UserError(
            f"label file {path} uses classes absent from training: {', '.join(unknown[:5])}; "
            "pass the label file that belongs to these images"
        )
    return labels
