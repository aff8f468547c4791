"""Several hosts on one machine, as network namespaces (tests/netns.py): the digits job
trains across a Ray cluster of two nodes, each with its own address, as it would across
machines, and a lost node is replaced. Skipped only where namespaces cannot be made (not
root, no iproute2). The node losses without a replacement: test_node_loss.py; Slurm across
the namespaces: test_multinode_slurm.py."""

import json
import shutil

import pytest

from multinode import (
    DIGITS,
    assert_same_training,
    launch,
    lose_node_1,
    ray_nodes,
    ray_temp,
    train_worker_nodes,
)


@pytest.mark.slow
def test_ray_job_across_two_nodes_matches_one_node(hosts, digits_root, one_node_run, tmp_path):
    """The digits job launched from n0 onto the two-node cluster: one worker per node, one set
    of checkpoints, and the training of one node bit for bit (two ranks sum their gradients
    in the same order whatever the transport)."""
    try:
        with ray_nodes(hosts, tmp_path) as cluster:
            out = launch(
                *DIGITS,
                f"data.root={digits_root}",
                f"run.dir={tmp_path}",
                "--address",
                cluster.address,
                host=hosts[0],
                env=cluster.env,
            )
        workers = train_worker_nodes(hosts)
    finally:
        for h in hosts:
            shutil.rmtree(ray_temp(h), ignore_errors=True)
    run_dir = tmp_path / "digits"
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["world_size"] == 2 and result["steps"] == 6
    # Ray Train's placement-group cleaner, without a dashboard to ask, stays quiet here too
    assert "Failed to query Ray Train Controller" not in out.stdout + out.stderr
    # one training worker per node: the gradients crossed the namespaces' network
    assert workers == {"n0": 1, "n1": 1}
    # one set of checkpoints, written by both nodes into the one shared run directory
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text() == "step00000006"
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step00000003", "step00000006"]
    assert not list(ckpts.glob("tmp-*"))
    for step in ckpts.glob("step*"):
        meta = json.loads((step / "meta.json").read_text())
        assert meta["world_size"] == 2 and all((step / f).is_file() for f in meta["files"])
    assert_same_training(run_dir, one_node_run)


@pytest.mark.slow
def test_a_lost_worker_node_is_replaced_and_the_run_ends_as_if_uninterrupted(
    hosts, digits_root, one_node_run, tmp_path
):
    """With the defaults, Ray Train restarts the workers (distributed.max_failures) on the
    replacement node and they continue from the run's latest checkpoint to the uninterrupted
    run's weights, bit for bit."""
    code, out, _ = lose_node_1(hosts, digits_root, tmp_path, replace=True)
    assert code == 0, out[-4000:]
    run_dir = tmp_path / "digits"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["world_size"] == 2 and result["steps"] == 6
    assert_same_training(run_dir, one_node_run)
