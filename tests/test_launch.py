"""Launching: the scripts' exact commands (dry run), SLURM rank discovery, the submitit launcher
config, and a real two-process run that finds its ranks the way SLURM tasks do."""
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mink_ssl.engine.distributed import DistInfo, first_slurm_host, rendezvous_from_env

REPO = Path(__file__).resolve().parents[1]


def dry_run(script, env, *args):
    done = subprocess.run(["bash", str(REPO / "docker" / script), *args], capture_output=True,
                          text=True, env={"PATH": os.environ["PATH"], "DRY_RUN": "1", **env})
    assert done.returncode == 0, done.stderr
    return shlex.split(done.stdout)


def test_single_node_dry_run_prints_the_command():
    assert dry_run("launch_single_node.sh", {"NGPUS": "4", "RUN_DIR": "runs/a"},
                   "data.root=/data/pairs", "batch_size=4") == [
        "torchrun", "--standalone", "--nproc_per_node", "4", "-m", "mink_ssl.cli.pretrain",
        "hydra.run.dir=runs/a", "data.root=/data/pairs", "batch_size=4"]


def test_multi_node_dry_run_resolves_the_rendezvous():
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29600",
           "NGPUS": "8", "RUN_DIR": "/shared/runs/pt"}
    assert dry_run("launch_multi_node.sh", env, "data.root=/data/pairs",
                   "objectives.hardest_contrastive.weight=0.5") == [
        "torchrun", "--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "8",
        "--rdzv_backend", "c10d", "--rdzv_endpoint", "node0:29600", "--rdzv_id", "mink-ssl",
        "-m", "mink_ssl.cli.pretrain", "hydra.run.dir=/shared/runs/pt", "data.root=/data/pairs",
        "objectives.hardest_contrastive.weight=0.5"]


def test_multi_node_requires_its_variables():
    done = subprocess.run(["bash", str(REPO / "docker" / "launch_multi_node.sh")],
                          capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "DRY_RUN": "1", "NNODES": "2"})
    assert done.returncode != 0 and "MASTER_ADDR" in done.stderr


def test_slurm_dry_run_uses_the_allocation():
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "3", "SLURM_GPUS_PER_NODE": "h100:4",
           "MASTER_ADDR": "gpu07"}
    assert dry_run("slurm_pretrain.sbatch", env, "data.root=/data/pairs") == [
        "srun", "torchrun", "--nnodes", "3", "--nproc_per_node", "4", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", "gpu07:29500", "--rdzv_id", "4242", "-m", "mink_ssl.cli.pretrain",
        "hydra.run.dir=runs/pretrain/slurm-4242", "data.root=/data/pairs"]
    done = subprocess.run(["bash", str(REPO / "docker" / "slurm_pretrain.sbatch")],
                          capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], "DRY_RUN": "1"})
    assert done.returncode != 0 and "sbatch" in done.stderr


@pytest.mark.parametrize("nodelist, host", [("gpu[07-09,12],cpu1", "gpu07"), ("node1", "node1"),
                                            ("node1,node2", "node1"), ("a-b[003,005]", "a-b003")])
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_rendezvous_from_slurm_and_torchrun_environments():
    slurm = {"SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1",
             "SLURM_JOB_NODELIST": "gpu[07-08]"}
    info, env = rendezvous_from_env(slurm)
    assert info == DistInfo(9, 16, 1)
    assert env == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                   "MASTER_PORT": "29500"}
    # torchrun inside a SLURM task (the sbatch script): torchrun's variables win
    info, env = rendezvous_from_env({**slurm, "RANK": "3", "WORLD_SIZE": "24",
                                     "LOCAL_RANK": "3"})
    assert info == DistInfo(3, 24, 3) and env == {}
    assert rendezvous_from_env({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) == (DistInfo(), {})
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        rendezvous_from_env({"SLURM_NTASKS": "2", "SLURM_PROCID": "0"})


def test_submitit_launcher_config_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                        reason="the submitit launcher is an extra: pip install -e .[slurm]")
    from hydra import compose, initialize_config_dir

    from mink_ssl.cli.pretrain import _register_schema

    _register_schema()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="pretrain", return_hydra_config=True,
                      overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=2",
                                 "hydra.launcher.gpus_per_node=4"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 4, 4)


@pytest.mark.slow
def test_two_slurm_style_tasks_form_one_process_group(tmp_path):
    """What each submitit/srun task does: no torchrun, ranks from SLURM_* variables."""
    from data_prep.pairs.prep import PrepParams, run as run_prep
    from data_prep.synthetic import generate_scene

    generate_scene(tmp_path / "raw", "scene0000_00", 0, n_frames=76)
    run_prep(tmp_path / "raw", tmp_path / "pairs", PrepParams(frame_skip=25), progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "mink_ssl.cli.pretrain", f"data.root={tmp_path / 'pairs'}",
           "model=res16unet14a", "model.out_channels=8", "data.voxel_size=0.1",
           "data.num_workers=0", "objective=[point_info_nce]",
           "objectives.point_info_nce.num_matches=128", "max_iterations=2", "batch_size=1",
           "device=cpu", "progress=false", f"hydra.run.dir={run_dir}"]
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(base, OMP_NUM_THREADS="1", SLURM_NTASKS="2",
                                                  SLURM_PROCID=str(r), SLURM_LOCALID=str(r),
                                                  SLURM_JOB_NODELIST="localhost",
                                                  MASTER_PORT=str(port)))
             for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "batch 1 per rank x 2 ranks = 2 global" in outs[0][0]
    assert outs[1][0].strip() == ""  # rank 1 prints nothing
    assert (run_dir / "backbone.pth").is_file()
