"""Stand-in training payload for launcher tests: report this rank's launch environment and prove that all ranks
joined one process group.

Run as `BDLORA_TRAIN_MODULE=tests.launch_probe launch/train.sh CONFIG ...`; accepts the trainer's command line
(`--config C.yaml [k.sub=v ...]`). Each rank prints one line `PROBE {json}`; the all-reduce sums rank + 1 over
the world, so a correct launch gives WORLD_SIZE * (WORLD_SIZE + 1) / 2 on every rank. PROBE_EXIT_CODE=n makes
every rank exit with n after reporting (to test that launchers pass failures on).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

import torch
import torch.distributed as dist


def main() -> None:
    """Join the gloo group torchrun set up, all-reduce, and print one PROBE line per rank."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="run config path (only echoed back)")
    p.add_argument("overrides", nargs="*", help="config overrides (only echoed back)")
    args = p.parse_args()
    dist.init_process_group("gloo")
    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    env = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                                           "MASTER_PORT", "SLURM_NODEID", "SLURM_JOB_ID", "CUDA_VISIBLE_DEVICES")}
    report = {**env, "all_reduce": value.item(), "config": args.config, "overrides": args.overrides,
              "hostname": socket.gethostname()}
    # one write per line: ranks share the stream (srun merges them) and must not interleave mid-line
    os.write(1, ("PROBE " + json.dumps(report) + "\n").encode())
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(int(os.environ.get("PROBE_EXIT_CODE", "0")))


if __name__ == "__main__":
    main()
