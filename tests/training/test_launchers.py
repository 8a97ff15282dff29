"""Launch scripts: launch/train.sh (single-node torchrun) and launch/slurm/train.sbatch on a real local Slurm.

The payload is tests/launch_probe.py (via BDLORA_TRAIN_MODULE): every rank reports its launch environment and a
gloo all-reduce of rank + 1, so one correct process group of W ranks gives W (W + 1) / 2 everywhere. The last
test runs the real trainer through sbatch. The Slurm tests start tests/training/slurm/local_cluster.sh (installing Slurm
with apt-get if needed) and fail, never skip, when that cannot work here.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN_SH = REPO / "launch" / "train.sh"
SBATCH_SCRIPT = REPO / "launch" / "slurm" / "train.sbatch"
LOCAL_CLUSTER = Path(__file__).resolve().parent / "slurm" / "local_cluster.sh"
PROBE = "tests.launch_probe"
PROBE_LINE = re.compile(r"PROBE (\{.*?\})$", re.MULTILINE)


def _config(tmp_path: Path, parallel: str) -> Path:
    path = tmp_path / "probe.yaml"
    path.write_text(f"parallel: {parallel}\nlora: {{rank: 8}}\n")
    return path


def _probes(output: str) -> list[dict]:
    """PROBE reports in an output, sorted by global rank."""
    return sorted((json.loads(m) for m in PROBE_LINE.findall(output)), key=lambda r: int(r["RANK"]))


def _assert_one_group(reports: list[dict], world: int, output: str) -> None:
    assert [int(r["RANK"]) for r in reports] == list(range(world)), f"ranks missing or duplicated:\n{output}"
    assert {int(r["WORLD_SIZE"]) for r in reports} == {world}
    assert {r["all_reduce"] for r in reports} == {world * (world + 1) / 2}, "ranks did not join one group"
    assert len({(r["MASTER_ADDR"], r["MASTER_PORT"]) for r in reports}) == 1


def _train_sh(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(TRAIN_SH), *args], cwd=REPO, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120)


# --------------------------------------------------------------------------------------------------------------
# launch/train.sh


@pytest.mark.multi_rank
def test_train_sh_runs_n_ranks_in_one_group_and_passes_overrides(tmp_path):
    config = _config(tmp_path, "{tp: 1}")
    res = _train_sh([str(config), "2", "lora.rank=4", "schedule.train_steps=3"], BDLORA_TRAIN_MODULE=PROBE)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out
    reports = _probes(res.stdout)
    _assert_one_group(reports, 2, out)
    assert {r["LOCAL_RANK"] for r in reports} == {"0", "1"}
    assert all(r["config"] == str(config) and r["overrides"] == ["lora.rank=4", "schedule.train_steps=3"]
               for r in reports)
    assert f"--standalone --nproc_per_node 2 -m {PROBE} --config {config}" in res.stderr  # the printed command


@pytest.mark.multi_rank
def test_train_sh_takes_n_from_config_tp(tmp_path):
    res = _train_sh([str(_config(tmp_path, "{tp: 2}"))], BDLORA_TRAIN_MODULE=PROBE)
    assert res.returncode == 0, res.stdout + res.stderr
    _assert_one_group(_probes(res.stdout), 2, res.stdout + res.stderr)


@pytest.mark.parametrize(("parallel", "overrides", "expected"), [
    ("{tp: 2}", [], 2),
    ("{tp: 2, dp: 3}", [], 6),
    ("{tp: 2, dp: null}", [], 2),
    ("{tp: 2}", ["parallel.dp=4", "lora.rank=2"], 8),
    ("{tp: 4, dp: 2}", ["parallel.tp=1"], 2),
    ("{micro_batch_size: 2}", [], 1),
])
def test_world_size_is_tp_times_dp_with_overrides_applied(tmp_path, parallel, overrides, expected):
    config = _config(tmp_path, parallel)
    script = 'source "$1"; bdlora_world_size "$(bdlora_python "$2")" "${@:3}"'
    res = subprocess.run(["bash", "-c", script, "bash", str(TRAIN_SH), str(REPO), str(config), *overrides],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout) == expected


@pytest.mark.multi_rank
def test_train_sh_exit_code_propagates(tmp_path):
    config = _config(tmp_path, "{tp: 1}")
    res = _train_sh([str(config), "1"], BDLORA_TRAIN_MODULE=PROBE, PROBE_EXIT_CODE="3")
    assert res.returncode != 0, res.stdout + res.stderr
    assert len(_probes(res.stdout)) == 1  # the payload ran; its failure came back through torchrun
    missing = _train_sh([str(tmp_path / "missing.yaml")])
    assert missing.returncode == 2 and "does not exist" in missing.stderr


# --------------------------------------------------------------------------------------------------------------
# launch/slurm/train.sbatch on a local two-node Slurm (two slurmd on 127.0.0.1; node names do not resolve)


class LocalSlurm:
    """A running tests/training/slurm/local_cluster.sh cluster and how to submit to it."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}

    def sbatch(self, args: list[str], config: Path | str, overrides: list[str], export: str) -> tuple[int, str, str]:
        """Submit train.sbatch with --wait; return (sbatch exit code, job id, job output)."""
        out_dir = self.root / "out"
        out_dir.mkdir(exist_ok=True)
        cmd = ["sbatch", "--wait", "--parsable", f"--chdir={REPO}", f"--output={out_dir}/%x-%j.out",
               f"--export={export}", *args, str(SBATCH_SCRIPT), str(config), *overrides]
        res = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=240)
        job_id = res.stdout.strip().split(";")[0]
        assert job_id.isdigit(), f"sbatch did not submit: {res.stdout}{res.stderr}"
        out_file = out_dir / f"bdlora-train-{job_id}.out"
        # a job that never ran can still make sbatch --wait exit 0: its output file is the evidence
        assert out_file.is_file(), f"job {job_id} wrote no output ({res.stderr}); slurmd log:\n{self.logs()}"
        return res.returncode, job_id, out_file.read_text()

    def job_record(self, job_id: str) -> dict[str, str]:
        """State and exit code of a finished job, from the job completion log (no slurmdbd here, so no sacct)."""
        for line in (self.root / "log" / "jobcomp.txt").read_text().splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if fields.get("JobId") == job_id:
                return fields
        raise AssertionError(f"job {job_id} is not in the job completion log")

    def logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in sorted((self.root / "log").glob("slurm*.log")))


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    res = subprocess.run([str(LOCAL_CLUSTER), "start", str(root)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NODES": "2", "CPUS": "8", "GPUS": "8"})
    if res.returncode != 0:
        subprocess.run([str(LOCAL_CLUSTER), "stop", str(root)], capture_output=True, timeout=60)
        pytest.fail(f"could not start a local Slurm cluster (needed for the sbatch tests):\n{res.stdout}{res.stderr}")
    yield LocalSlurm(root)
    subprocess.run([str(LOCAL_CLUSTER), "stop", str(root)], capture_output=True, timeout=60)


@pytest.mark.multi_rank
def test_sbatch_two_nodes_rendezvous_at_first_node_addr_with_a_rank_per_gpu(slurm, tmp_path):
    config = _config(tmp_path, "{tp: 8}")  # ignored: NPROC_PER_NODE comes from the GPUs Slurm gave each node
    rc, job_id, out = slurm.sbatch(["--nodes=2", "--gpus-per-node=2", "--cpus-per-task=2"], config, ["lora.rank=4"],
                                   export=f"ALL,BDLORA_TRAIN_MODULE={PROBE}")
    assert rc == 0, out
    reports = _probes(out)
    _assert_one_group(reports, 4, out)
    assert sorted(r["SLURM_NODEID"] for r in reports) == ["0", "0", "1", "1"]
    assert {r["SLURM_JOB_ID"] for r in reports} == {job_id}
    assert {r["CUDA_VISIBLE_DEVICES"] for r in reports} == {"0,1"}
    assert all(r["overrides"] == ["lora.rank=4"] for r in reports)
    # the printed command: c10d rendezvous at node 1's NodeAddr (its name bdlora-n1 does not resolve)
    assert re.search(rf"--nnodes 2 --nproc_per_node 2 --rdzv_id {job_id} --rdzv_backend c10d "
                     rf"--rdzv_endpoint 127\.0\.0\.1:\d+ -m {PROBE}", out), out
    record = slurm.job_record(job_id)
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0")


@pytest.mark.multi_rank
def test_sbatch_without_gpus_takes_nproc_from_config_and_fails_with_the_payload(slurm, tmp_path):
    config = _config(tmp_path, "{tp: 2}")
    rc, job_id, out = slurm.sbatch(["--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2"], config, [],
                                   export=f"NONE,BDLORA_TRAIN_MODULE={PROBE},PROBE_EXIT_CODE=3")
    reports = _probes(out)
    _assert_one_group(reports, 2, out)  # ran (with an empty environment) before exiting with 3 on every rank
    assert rc != 0, out
    record = slurm.job_record(job_id)
    assert record["JobState"] == "FAILED" and record["ExitCode"] != "0:0", record


@pytest.mark.multi_rank
@pytest.mark.slow
def test_sbatch_trains_tiny_llama_with_tp_across_two_nodes(slurm, tmp_path, demo_data):
    run_dir = tmp_path / "run"
    overrides = ["schedule.train_steps=2", "schedule.warmup_steps=1", "checkpoint.every=0",
                 "logging.eval_batches=1", "logging.progress=false", f"logging.dir={run_dir}",
                 f"data.train={demo_data / 'milton' / 'train.txt'}", f"data.valid={demo_data / 'milton' / 'valid.txt'}"]
    # no GPUs: NPROC_PER_NODE = tp 2 / 2 nodes = 1, so the tensor-parallel pair spans the two "nodes"
    rc, job_id, out = slurm.sbatch(["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1"],
                                   "configs/tiny-llama-bdlora-tp2.yaml", overrides, export="ALL")
    assert rc == 0, out
    assert "--nnodes 2 --nproc_per_node 1" in out and "-m megatron_bdlora.train" in out
    assert "done: step 2" in out, out
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and all(math.isfinite(s["loss"]) for s in steps)
    assert (run_dir / "checkpoints" / "step_000002").is_dir()
    record = slurm.job_record(job_id)
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0")
