"""Scale-out as cluster users run it: every objective and adversary under two gloo processes (train, evaluate,
monitors, pictures, end), two nodes on loopback resuming from a shared and a non-shared folder, streaming next to a
render, the Slurm and Ray launcher configs (a fake ``sbatch`` that runs the job here), devices."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from apps.cli import main

sys.path.insert(0, str(Path(__file__).parents[1] / "synth"))
from packed_helpers import make_shard  # the shard writer of tests/synth (tests are not a package)

ROOT = Path(__file__).parents[2]
TINY = ["trainer.batch_size=2", "trainer.eval_batches=1", "data.augment.size=32", "trainer.log_every=1",
        "trainer.warmup_steps=1", "trainer.checkpoint_every=1000"]


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def _torchrun(args: list[str], cwd: Path, port: int, *, timeout: float = 600, node: tuple[int, int] | None = None,
              background: bool = False):
    launch = ["--nproc_per_node=2", "--nnodes=1"] if node is None else [
        "--nproc_per_node=1", f"--nnodes={node[1]}", f"--node_rank={node[0]}", "--master_addr=127.0.0.1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, f"--master_port={port}", "-m", "apps.cli",
           "pretrain", *args]
    if background:
        return subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


# Every objective and both adversaries in two launches; evaluation, monitors and pictures at step 2 and at the end.
GROUPS = {
    "synthetic_contrastive_gan": ["objective=[depth,normal,contour,rotation,jigsaw,simclr]", "adapt=feature_gan",
                                  "monitor=[knn_probe,domain_gap]", "monitor.knn_probe.n_train=20",
                                  "monitor.knn_probe.n_test=10"],
    "generative_moco_dann": ["objective=[relpos,colorization,inpainting,moco]", "adapt=dann", "monitor=[]",
                             "objective.moco.queue_size=64"],
}


@pytest.mark.slow
@pytest.mark.parametrize("group", sorted(GROUPS))
def test_every_objective_and_adversary_runs_under_two_gloo_processes(group, rendered_dataset, tmp_path):
    out = tmp_path / "run"
    port = 29531 + sorted(GROUPS).index(group)
    result = _torchrun([f"data.roots=[{rendered_dataset}]", f"out_dir={out}", "trainer.steps=4",
                        "trainer.eval_every=2", "trainer.image_every=2", "data.holdout=0.3", "trainer.batch_size=4",
                        *(a for a in TINY if not a.startswith("trainer.batch_size")), *GROUPS[group]],
                       tmp_path, port)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    first, second = summary["rank_fingerprints"]
    assert first == second, "both ranks hold the same weights"
    names = next(o.split("=")[1].strip("[]").split(",") for o in GROUPS[group] if o.startswith("objective="))
    for name in names:  # every objective was evaluated (SimCLR's gather included)
        assert any(k.startswith(f"eval/{name}") for k in summary["eval"]), (name, sorted(summary["eval"]))
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert list((out / "pictures").glob("step_0000002*.png")), "pictures during training"
    if "monitor=[]" not in GROUPS[group]:
        assert "probe/knn_acc/layer4" in summary["monitors"] and "gap/layer4/mmd_rbf" in summary["monitors"]
        steps = [json.loads(line)["step"] for line in (out / "monitor_log.jsonl").read_text().splitlines()]
        assert steps == [2, 4]


def _two_nodes(args: list[str], out_dirs: tuple[Path, Path], cwd: Path, port: int):
    nodes = [_torchrun([*args, f"out_dir={out_dirs[rank]}"], cwd, port, node=(rank, 2), background=True)
             for rank in (0, 1)]
    results = []
    for proc in nodes:
        _, stderr = proc.communicate(timeout=600)
        results.append((proc.returncode, stderr))
    return results


@pytest.mark.slow
def test_two_nodes_resume_from_a_shared_folder_and_refuse_a_folder_that_is_not_shared(rendered_dataset, tmp_path):
    args = [f"data.roots=[{rendered_dataset}]", "objective=[depth]", "data.real=null", "monitor=[]",
            "trainer.steps=2", "trainer.image_every=0", *TINY]
    shared = tmp_path / "shared"
    for attempt in ("first", "resumed"):
        results = _two_nodes(args, (shared, shared), tmp_path, 29541)
        assert all(code == 0 for code, _ in results), (attempt, [err[-2000:] for _, err in results])
    summary = json.loads((shared / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 2

    # Node 1 sees its own, empty folder: both ranks stop at once, with one line, instead of hanging in a collective.
    start = time.monotonic()
    results = _two_nodes(args, (shared, tmp_path / "node1_local"), tmp_path, 29542)
    assert time.monotonic() - start < 300
    assert all(code != 0 for code, _ in results)
    lines = [line for _, err in results for line in err.splitlines() if "error:" in line]
    assert lines and all("out_dir must be one folder shared by every node" in line for line in lines), lines
    assert "rank 0" in lines[0] and "step 2" in lines[0] and "no checkpoint" in lines[0]


def test_streaming_waits_for_a_render_then_trains_with_a_held_out_split(tmp_path, capsys):
    """`data.streaming=true` started before the first frame: it waits, then trains, while shards keep landing."""
    root = tmp_path / "live"

    def render():  # shards land while training runs, as `synth render` writes them (scene seed = frame_id // 2)
        for shard in range(3):
            time.sleep(0.5)
            make_shard(root, range(8 * shard, 8 * shard + 8), shard=shard, h=40, w=40)

    writer = threading.Thread(target=render)
    writer.start()
    code = main(["pretrain", f"data.roots=[{root}]", "data.streaming=true", "data.refresh_s=0.2",
                 "data.holdout=0.3", "objective=[depth]", "data.real=null", "monitor=[]", f"out_dir={tmp_path / 'run'}",
                 "trainer.steps=6", "trainer.eval_every=3", "trainer.image_every=0", *TINY])
    writer.join()
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 6 and "eval/depth/abs_rel" in summary["eval"]


def test_a_monitor_without_enough_images_yet_warns_and_is_skipped_until_it_has_them(capsys):
    from apps.pretrain import GapWhenReady

    images = []

    def build():  # as the domain-gap monitor: too few rendered images until the render has written 6
        if len(images) < 6:
            raise ValueError(f"DomainGapMonitor: synthetic_images needs at least 6 images, got {len(images)}")
        return lambda backbone, step: {"gap/layer4/pad": 1.0}

    monitor = GapWhenReady(build)
    assert monitor(None, 3) == {}
    assert "monitor domain_gap skipped at step 3" in capsys.readouterr().out
    images.extend(range(6))
    assert monitor(None, 6) == {"gap/layer4/pad": 1.0}


def test_launcher_configs_size_jobs_from_the_render_settings():
    from hydra.core.global_hydra import GlobalHydra

    import apps.render  # noqa: F401  (registers the resolvers)
    from apps.launch import compose

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    try:
        cfg = compose("synth_render", ["hydra/launcher=slurm", "render.threads=6", "render.device=gpu",
                                       "hydra.launcher.partition=gpu", "hydra.launcher.account=proj"])
        launcher = cfg.hydra.launcher
        assert (launcher.cpus_per_task, launcher.gpus_per_node, launcher.partition) == (6, 1, "gpu")
        assert launcher.additional_parameters.requeue is True and launcher.max_num_timeout > 0
        assert launcher.timeout_min >= 120 and ("activate" in launcher.setup[0] or "PATH" in launcher.setup[0])
        cfg = compose("synth_render", ["hydra/launcher=slurm"])
        assert (cfg.hydra.launcher.cpus_per_task, cfg.hydra.launcher.gpus_per_node) == (8, None)
        if sys.modules.get("hydra_plugins.hydra_ray_launcher") or _has("hydra_plugins.hydra_ray_launcher"):
            cfg = compose("synth_render", ["hydra/launcher=ray_cluster", "render.threads=4", "render.device='gpu:0,1'"])
            ray = cfg.hydra.launcher.ray
            assert ray.init.address == "auto" and ray.init.object_store_memory is None
            assert (ray.remote.num_cpus, ray.remote.num_gpus) == (4, 2)
    finally:
        GlobalHydra.instance().clear()


def test_the_local_launcher_runs_a_job_per_cpu_and_splits_the_cpus_between_them(monkeypatch):
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    import apps.render
    from apps.launch import compose

    monkeypatch.setattr(apps.render.os, "sched_getaffinity", lambda pid: set(range(6)))
    monkeypatch.setattr(apps.render.os, "cpu_count", lambda: 6)
    try:
        # 6 CPUs; shards of 10 scenes x 2 views: jobs = min(CPUs, 4, shards).
        for frames, jobs in ((20, 1), (40, 2), (200, 4)):
            cfg = compose("synth_render", [f"n_frames={frames}", "scene.views=2", "scenes_per_shard=10"])
            assert cfg.hydra.launcher.n_jobs == jobs
        assert compose("synth_render", ["hydra.launcher.n_jobs=3"]).hydra.launcher.n_jobs == 3
        # render=cycles_fast is render=cycles with fewer samples and no guide prefilter, nothing else.
        default, fast = (instantiate(compose("synth_render", [f"render={name}"]).render)
                         for name in ("cycles", "cycles_fast"))
        assert (fast.max_samples, fast.denoise_prefilter) == (8, "NONE")
        assert dataclasses.replace(fast, max_samples=16, denoise_prefilter="ACCURATE") == default
    finally:
        GlobalHydra.instance().clear()
    # render.threads=0 shares the CPUs between the jobs running at once; a number given stays.
    assert apps.render.allotted_threads(0, jobs=1) == 0  # every core: Cycles counts them itself
    assert apps.render.allotted_threads(0, jobs=2) == 3
    assert apps.render.allotted_threads(0, jobs=4) == 1
    assert apps.render.allotted_threads(2, jobs=4) == 2


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_a_launcher_without_its_extra_names_the_extra(monkeypatch, capsys, tmp_path):
    import importlib.util

    monkeypatch.chdir(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins.hydra_s") else real(name, *a))
    assert main(["render", "hydra/launcher=slurm"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install -e '.[slurm]'" in err


def test_a_missing_device_is_one_line_at_config_time(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for args in (["pretrain", "trainer=gpu"], ["pretrain", "trainer.device=cuda"]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "trainer.device" in err and "no CUDA device" in err, err
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert main(["render", "render.device=gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "render.device=gpu" in err
    assert main(["render", "render.device=tpu"]) == 2
    assert "render.device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_ddp_backend_follows_the_device():
    from synth.engine import ddp_backend

    assert ddp_backend(torch.device("cpu")) == "gloo" and ddp_backend(torch.device("cuda", 0)) == "nccl"


@pytest.mark.slow
def test_slurm_job_script_and_requeue_with_a_fake_sbatch(tmp_path):
    """`hydra/launcher=slurm` through a fake sbatch that records the script and runs it here as a node would; a
    relative out_dir lands where the command ran; a requeued (preempted) task renders only what is missing."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(textwrap.dedent(text).lstrip())
        (bin_dir / name).chmod(0o755)
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SLURM_DIR=str(tmp_path))
    cmd = [sys.executable, "-m", "apps.cli", "render", "hydra/launcher=slurm", "hydra.launcher.partition=cpu",
           "hydra.launcher.qos=low", "render.threads=2", "out_dir=rel_data", "n_frames=4", "scene.views=1",
           "scenes_per_shard=2", "render.width=32", "render.height=32", "label_check.frames=1", "preview=false"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    script = (tmp_path / "job.sh").read_text()
    for line in ("#SBATCH --cpus-per-task=2", "#SBATCH --requeue", "#SBATCH --partition=cpu", "#SBATCH --qos=low",
                 "#SBATCH --time=240", "#SBATCH --signal=USR2@120", "#SBATCH --array=0-1"):
        assert line in script, line
    assert "--gpus-per-node" not in script
    assert f"source {sys.prefix}/bin/activate" in script or f"export PATH={sys.prefix}/bin" in script
    assert "export OMP_NUM_THREADS=2" in script
    data = tmp_path / "rel_data"
    assert "total       4" in result.stdout and all(len(_index(data, k)) == 2 for k in (0, 1))

    # Preempted halfway through shard 1 (2 scenes of one view): Slurm requeues the same script; the new job renders
    # the missing scene only.
    records = _index(data, 1)
    (data / "shard_00001" / "index.jsonl").write_text(json.dumps(records[0]) + "\n")
    kept = (data / "shard_00001" / records[0]["file"]).stat().st_mtime_ns
    requeue = subprocess.run(["bash", str(tmp_path / "job.sh")], cwd=tmp_path, capture_output=True, text=True,
                             env={**env, **FAKE_NODE, "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "1",
                                  "SLURM_JOB_ID": "4244", "SLURM_CPUS_PER_TASK": "2"}, timeout=600)
    assert requeue.returncode == 0, requeue.stderr[-3000:]
    assert [r["frame_id"] for r in _index(data, 1)] == [r["frame_id"] for r in records]
    assert (data / "shard_00001" / records[0]["file"]).stat().st_mtime_ns == kept


def _index(data: Path, shard: int) -> list[dict]:
    path = data / f"shard_{shard:05d}" / "index.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


FAKE_NODE = {"SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "localhost",
             "SLURMD_NODENAME": "localhost"}
FAKE_SLURM = {
    # Keeps the job script, answers with a job id, then runs each array task here in the background, with the
    # variables a node sets (submitit reads them), and marks it done for the fake sacct.
    "sbatch": r"""
        #!/bin/bash
        script="${@: -1}"
        cp "$script" "$FAKE_SLURM_DIR/job.sh"
        job=4242
        range=$(sed -n 's/^#SBATCH --array=\([0-9]*\)-\([0-9]*\).*/\1 \2/p' "$script")
        export SLURM_JOB_NUM_NODES=1 SLURM_NNODES=1 SLURM_NTASKS=1 SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_NODEID=0 \
          SLURM_JOB_NODELIST=localhost SLURMD_NODENAME=localhost \
          SLURM_CPUS_PER_TASK=$(sed -n 's/^#SBATCH --cpus-per-task=//p' "$script")
        (
          sleep 1
          for task in $(seq ${range:-0 0}); do
            if [ -n "$range" ]; then
              export SLURM_ARRAY_JOB_ID=$job SLURM_ARRAY_TASK_ID=$task SLURM_JOB_ID=$((job + task + 1)); id=${job}_$task
            else
              export SLURM_JOB_ID=$job; id=$job
            fi
            bash "$script" > "$FAKE_SLURM_DIR/task_$task.log" 2>&1
            echo "$id" >> "$FAKE_SLURM_DIR/done"
          done
        ) < /dev/null > /dev/null 2>&1 &
        echo "Submitted batch job $job"
        """,
    "sacct": r"""
        #!/bin/bash
        echo "JobID|State|NodeList"
        for id in 4242 4242_0 4242_1 4242_2 4242_3; do
          if grep -qx "$id" "$FAKE_SLURM_DIR/done" 2>/dev/null; then s=COMPLETED; else s=RUNNING; fi
          echo "$id|$s|localhost"
        done
        """,
    "srun": r"""
        #!/bin/bash
        while [[ "$1" == --* ]]; do case "$1" in --unbuffered) shift;; *=*) shift;; *) shift 2;; esac; done
        exec "$@"
        """,
    "scancel": "#!/bin/bash\n",
}


def test_threads_devices_and_worker_lifetimes_do_not_change_a_datasets_identity(tmp_path):
    from render.shard import DatasetMismatchError, claim_manifest, dataset_manifest
    from render.worker import RenderSettings, parse_render_device
    from synth.sampling import TabletopScene

    sampler = TabletopScene()
    claim_manifest(tmp_path, dataset_manifest(sampler, RenderSettings(), seed=0, scenes_per_shard=5))
    claim_manifest(tmp_path, dataset_manifest(sampler, RenderSettings(threads=8, device="gpu:1", recycle_every=3),
                                              seed=0, scenes_per_shard=5))  # a resume on a cluster node
    with pytest.raises(DatasetMismatchError, match="max_samples"):
        claim_manifest(tmp_path, dataset_manifest(sampler, RenderSettings(max_samples=32), seed=0, scenes_per_shard=5))
    assert parse_render_device("gpu:0,2") == ("gpu", [0, 2]) and parse_render_device("cpu") == ("cpu", None)
    for bad in ("cuda", "gpu:", "gpu:-1", "gpu:a"):
        with pytest.raises(ValueError, match=r"render\.device"):
            parse_render_device(bad)
    with pytest.raises(ValueError, match=r"render\.threads"):
        RenderSettings(threads=-1)
