"""What the first GPU node would trip over, checked on the CPU: resources detected rather than
declared, shared paths confirmed by every worker, the launch environment forwarded to workers
of a cluster joined by address, the Triton cache and warm-up, and checkpoint decisions.

The shared-path and forwarding tests join a Ray cluster started in a mount namespace of its
own, where one folder is covered by an empty one: its workers see that path as a worker on a
node without the shared mount would, and inherit the environment of the cluster, not of the
launch (skipped where mount namespaces cannot be made: not root, no unshare)."""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from addertrain import config, warmup
from addertrain.checkpoint import Checkpointer
from addertrain.distributed import WorldInfo
from addertrain.errors import UserError
from addertrain.launch import nodes
from conftest import cli

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TINY = [
    "recipes/synthetic_tiny.yaml",
    "distributed.executor=ray",
    "distributed.workers=1",
    "train.max_steps=2",
    "train.eval_interval=0",
    "data.image_size=8",
    "logging.progress=false",
    "logging.plots=false",
    "logging.tensorboard=false",
]


def one_error_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    errors = [line for line in out.stderr.splitlines() if line.startswith("addertrain: error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return errors[0]


# -- resources ---------------------------------------------------------------------------------


def test_embedded_ray_refuses_gpus_that_do_not_exist(tmp_path):
    """Before: the embedded cluster declared the GPUs the recipe asked for, and the worker
    failed on a GPU id that did not exist. Now: one line naming what the machine has."""
    out = cli("launch", *TINY, "distributed.gpus_per_worker=1", f"run.dir={tmp_path}", timeout=120)
    line = one_error_line(out)
    assert "need 1 GPU in all" in line and "this machine has" in line and "0 GPU" in line, line
    assert not (tmp_path / "synthetic-tiny").exists()  # nothing left behind


# -- environment forwarding --------------------------------------------------------------------


def test_forwarded_variables_by_prefix():
    assert all(
        nodes.forwarded(name)
        for name in (
            "NCCL_SOCKET_IFNAME",
            "NCCL_IB_HCA",
            "TORCH_NCCL_ASYNC_ERROR_HANDLING",
            "TRITON_CACHE_DIR",
            "DALI_DISABLE_NVML",
            "CUDA_LAUNCH_BLOCKING",
            "OMP_NUM_THREADS",
            "GLOO_SOCKET_IFNAME",
        )
    )
    # Ray assigns the GPUs of each worker; nothing else of the launch's environment travels
    assert not any(
        nodes.forwarded(name)
        for name in ("CUDA_VISIBLE_DEVICES", "HOME", "PATH", "RAY_ADDRESS", "NCCL", "MY_NCCL_VAR")
    )


# -- a Ray cluster whose workers do not see one folder -----------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stop ``ray start --block`` (it stops what it started) and anything of it that is left."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    for p in family:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def split_cluster(tmp_path_factory):
    """A one-node Ray cluster (token authentication on) in a mount namespace where ``hidden``
    is covered by an empty folder; yields (address, the client's environment, shared, hidden)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("mount namespaces need root and unshare")
    base = tmp_path_factory.mktemp("split")
    shared, hidden, empty = base / "shared", base / "hidden", base / "empty"
    for folder in (shared, hidden, empty):
        folder.mkdir()
    token = base / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    temp = Path(tempfile.mkdtemp(prefix="ctr-", dir="/tmp"))  # Ray's socket paths stay short
    env = {
        **os.environ,
        **auth,
        "RAY_ADDRESS": address,
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
    }
    cmd = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        'mount --bind "$1" "$2" || exit 1; shift 2; exec "$@"',
        "sh",
        str(empty),
        str(hidden),
        "ray",
        "start",
        "--head",
        "--block",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=2",
        "--num-gpus=0",
        "--include-dashboard=false",
        "--disable-usage-stats",
        "--object-store-memory=100000000",
        f"--temp-dir={temp}",
    ]
    log = open(base / "ray.log", "wb")
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (base / "ray.log").read_text()[-3000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the Ray head did not come up"
                time.sleep(1)
        yield address, auth, shared, hidden
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_worker_that_does_not_see_the_run_directory_stops_the_launch(split_cluster):
    address, auth, shared, hidden = split_cluster
    out = cli("launch", *TINY, f"run.dir={hidden / 'runs'}", "--address", address, env=auth)
    line = one_error_line(out)
    assert (
        f"worker rank 0 on node {socket.gethostname()} (" in line and "finds no .run-token" in line
    )
    assert str(hidden / "runs" / "synthetic-tiny") in line and "set run.dir to a path" in line


def test_worker_checks_the_token_and_the_dataset_splits(tmp_path):
    """What every worker runs at start (launch/nodes.py), here in this process; the test above
    shows a worker of a cluster running it."""
    run = tmp_path / "runs"
    cfg = config.load(ROOT / "recipes/synthetic_tiny.yaml", [f"run.dir={run}"])
    cfg.run_dir().mkdir(parents=True)
    token = nodes.write_token(cfg.run_dir())
    nodes.check(cfg, token, 3, "n1 (10.0.0.2)")
    with pytest.raises(UserError, match=r"rank 3 on node n1 \(10.0.0.2\) finds another launch's"):
        nodes.check(cfg, "0" * 32, 3, "n1 (10.0.0.2)")
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    cfg = config.load(
        ROOT / "recipes/synthetic_tiny.yaml",
        [f"run.dir={run}", "data.source=folder", f"data.root={data}"],
    )
    with pytest.raises(
        UserError, match=f"node n1 .* does not see the dataset folder {data / 'val'}"
    ):
        nodes.check(cfg, token, 3, "n1 (10.0.0.2)")


@pytest.mark.slow
def test_launch_environment_reaches_workers_of_a_joined_cluster(split_cluster):
    """The cluster's workers inherit its environment, not the launch's: TRITON_*, NCCL_* ...
    set for the job travel with it (each worker records what it got in workers/rank<r>.json)."""
    address, auth, shared, hidden = split_cluster
    out = cli(
        "launch",
        *TINY,
        f"run.dir={shared / 'runs'}",
        "train.eval_interval=1",
        "--address",
        address,
        env={**auth, "TRITON_TEST_FORWARD": "xyz", "NCCL_TEST_FORWARD": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run = shared / "runs" / "synthetic-tiny"
    report = json.loads((run / "workers" / "rank0.json").read_text())
    assert (
        report["env"]["TRITON_TEST_FORWARD"] == "xyz" and report["env"]["NCCL_TEST_FORWARD"] == "1"
    )
    assert report["node"].startswith(f"{socket.gethostname()} (")
    # the final checkpoint records the best evaluation so far, for a resumed run's decisions
    meta = json.loads((run / "checkpoints" / "step00000002" / "meta.json").read_text())
    assert meta["best_top1"] == meta["top1"] is not None


# -- Triton: cache and warm-up -----------------------------------------------------------------


def test_warmup_lists_the_recipe_shapes_and_has_nothing_to_compile_on_cpu():
    out = cli("warmup", "recipes/resnet50_imagenet.yaml", timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "resnet50: 22 distinct adder layer shapes at micro batch 32, 224 px"
    shapes = [line.split() for line in lines[1:23]]
    assert " ".join(shapes[0]) == "1x1 64->256 s1 @56x56 x4"
    assert sum(int(s[-1][1:]) for s in shapes) == 52  # every adder layer of ResNet-50 (stem: conv)
    assert lines[-1].startswith("nothing to compile: no CUDA device here")


def test_warmup_shapes_follow_the_micro_batch_and_image_size():
    cfg = config.load(
        ROOT / "recipes/resnet18_imagenet.yaml", ["train.micro_batch=64", "train.global_batch=512"]
    )
    shapes = warmup.layer_shapes(cfg)
    assert [layer.shape for layer in shapes][:2] == [
        (64, 64, 56, 56, 64, 3, 1, 1),
        (64, 64, 56, 56, 128, 1, 2, 0),
    ]
    assert sum(layer.count for layer in shapes) == 19  # 16 3x3 + 3 downsample 1x1
    cfg = config.load(ROOT / "recipes/synthetic_tiny.yaml", ["model.conv=conv"])
    assert warmup.nothing_to_compile(cfg) == "model.conv=conv has no adder layers"


def test_warmup_shapes_cover_every_adder_layer_of_every_recipe():
    from addertrain.model_io import create_model_from_config
    from addertrain.models import adder_layers

    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        cfg = config.load(path)
        if cfg.model.conv != "adder":
            continue
        shapes = warmup.layer_shapes(cfg)
        model = create_model_from_config(cfg)
        assert sum(layer.count for layer in shapes) == len(adder_layers(model)), path.name
    cfg = config.load(ROOT / "recipes/mnist5k_lenet5.yaml")
    # LeNet-5-BN: every layer an adder, the classifier too, on one gray channel
    assert [layer.shape for layer in warmup.layer_shapes(cfg)] == [
        (128, 1, 32, 32, 6, 5, 1, 0),
        (128, 6, 14, 14, 16, 5, 1, 0),
        (128, 16, 5, 5, 120, 5, 1, 0),
        (128, 120, 1, 1, 84, 1, 1, 0),
        (128, 84, 1, 1, 10, 1, 1, 0),
    ]


def test_triton_cache_is_private_and_node_local_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # what $TMPDIR sets
    path = warmup.use_node_cache()
    assert path == tmp_path / f"addertrain-triton-{os.getuid()}"
    assert path.stat().st_mode & 0o777 == 0o700 and os.environ["TRITON_CACHE_DIR"] == str(path)
    # a name in a shared temp folder that someone else prepared is refused
    monkeypatch.delenv("TRITON_CACHE_DIR")
    other = tmp_path / "other"
    monkeypatch.setattr(tempfile, "tempdir", str(other))
    other.mkdir()
    (other / f"addertrain-triton-{os.getuid()}").symlink_to(path)
    with pytest.raises(UserError, match="not a private folder of this user"):
        warmup.use_node_cache()
    # the user's own choice is taken as it is
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    assert warmup.use_node_cache() == tmp_path / "mine"


@pytest.mark.gpu
def test_warmup_caches_autotuning_for_the_next_process(tmp_path):
    """On CUDA: the first warm-up compiles and times, and leaves the autotuner's choices in the
    cache; a second process reads them back."""
    recipe = ["recipes/synthetic_tiny.yaml", "train.micro_batch=8", "train.global_batch=8"]
    env = {"TRITON_CACHE_DIR": str(tmp_path / "cache"), "TRITON_INTERPRET": "0"}
    first = cli("warmup", *recipe, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Triton kernels ready" in first.stdout
    tuned = list((tmp_path / "cache").rglob("*.autotune.json"))
    assert tuned and {p.name for p in tuned} <= {
        "_forward_kernel.autotune.json",
        "_grad_input_kernel.autotune.json",
    }, tuned
    second = cli("warmup", *recipe, env=env, timeout=600)
    assert second.returncode == 0 and "Triton kernels ready" in second.stdout
    assert sorted(tmp_path.joinpath("cache").rglob("*.autotune.json")) == sorted(tuned)


# -- checkpoints -------------------------------------------------------------------------------


def test_a_checkpoint_after_an_evaluation_only_for_a_new_best(tmp_path):
    cfg = config.load(ROOT / "recipes/synthetic_tiny.yaml", [f"run.dir={tmp_path}"])
    import torch

    follower = WorldInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    ckpt = Checkpointer(cfg, follower, engine=None, parts={})
    assert ckpt.wants_save_after_eval(10.0)  # nothing saved yet
    ckpt.best_top1 = 10.0
    assert not ckpt.wants_save_after_eval(10.0) and not ckpt.wants_save_after_eval(9.0)
    assert ckpt.wants_save_after_eval(10.5)
    cfg.checkpoint.keep_best = 0  # no best kept: evaluations wait for the periodic checkpoint
    assert not ckpt.wants_save_after_eval(99.0)
