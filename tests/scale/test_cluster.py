"""cluster/: script syntax, manifest structure and the dry runs (nothing is started)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "cluster" / "slurm" / "ray_8x8.sbatch"
SUBMIT = ROOT / "cluster" / "kuberay" / "submit.sh"
MANIFEST = ROOT / "cluster" / "kuberay" / "rayjob_8x8.yaml"


def sh(*args, env=None, check=True):
    return subprocess.run(["bash", *map(str, args)], capture_output=True, text=True, cwd=ROOT, check=check,
                          env={**os.environ, **(env or {})})


def test_scripts_parse():
    for script in (SBATCH, SUBMIT, ROOT / "scripts" / "install_vllm.sh"):
        sh("-n", script)


def test_slurm_dry_run_starts_head_workers_and_driver():
    out = sh(SBATCH, "train", "configs/ppo/tiny_cpu.yaml", "trainer.total_steps=5",
             env={"DRY_RUN": "1", "DRY_RUN_NODES": "gpu-a gpu-b gpu-c gpu-d gpu-e gpu-f gpu-g gpu-h"}).stdout
    lines = [l for l in out.splitlines() if l.startswith("[dry-run] srun")]
    head = [l for l in lines if "ray start --head" in l]
    workers = [l for l in lines if "ray start --address=gpu-a:6379" in l]
    assert len(head) == 1 and "-w gpu-a" in head[0] and "--num-gpus=8" in head[0]
    assert len(workers) == 7 and {l.split("-w ")[1].split()[0] for l in workers} == set("gpu-" + c for c in "bcdefgh")
    assert "GPU', 0)" in out and "g >= 64" in out  # waits for all 64 GPUs
    assert lines[-1].endswith("rlhf train configs/ppo/tiny_cpu.yaml trainer.total_steps=5 cluster.address=gpu-a:6379")
    assert all("RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=" in l for l in lines if "ray start" in l)
    bad = sh(SBATCH, "serve", "x.yaml", env={"DRY_RUN": "1"}, check=False)
    assert bad.returncode == 2 and "must be train or sweep" in bad.stderr


def test_kuberay_manifest_and_dry_run():
    raw = yaml.safe_load(MANIFEST.read_text())
    assert raw["kind"] == "RayJob" and raw["apiVersion"] == "ray.io/v1"
    out = sh(SUBMIT, "sweep", "configs/sweep/bai_ratios_tiny.yaml", "trainer.total_steps=5",
             env={"DRY_RUN": "1", "IMAGE": "reg/bai-rlhf:1", "JOB_NAME": "j1"}).stdout
    assert out.startswith("# [dry-run] kubectl apply -n default -f -")
    job = yaml.safe_load(out)
    assert job["metadata"]["name"] == "j1"
    assert job["spec"]["entrypoint"] == "rlhf sweep configs/sweep/bai_ratios_tiny.yaml trainer.total_steps=5"
    spec = job["spec"]["rayClusterSpec"]
    head_gpus = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    (workers,) = spec["workerGroupSpecs"]
    w_gpus = workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    assert head_gpus == 8 and w_gpus == 8 and workers["replicas"] == 7  # 8 pods x 8 GPUs = 64
    assert spec["rayVersion"] == "2.60.0"
    assert spec["authOptions"] == {"mode": "token"}  # no unauthenticated dashboard / job API (issue 12)
    assert "RAY_AUTH_MODE: disabled" not in MANIFEST.read_text()
    images = {c["image"] for g in [spec["headGroupSpec"], workers] for c in g["template"]["spec"]["containers"]}
    assert images == {"reg/bai-rlhf:1"}
    assert not [l for l in out.splitlines() if "${" in l and not l.lstrip().startswith("#")]
