"""What ran where: versions, machine and code, recorded beside every benchmark or check result."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

PACKAGES = ("torch", "triton", "megatron-core", "transformers", "peft", "deepspeed", "safetensors")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions by distribution name (metadata only: importing peft alone takes seconds); None if absent."""
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def repo_root() -> Path:
    """The checkout the package runs from (the git repository whose commit `code_version` records)."""
    return Path(__file__).resolve().parents[2]


def code_version(commit: str | None = None) -> dict:
    """The commit of the package that ran and the tracked files changed since; `commit`, when given, names it
    (a working tree copied to a GPU node may carry a stale .git)."""
    repo = repo_root()

    def git(*cmd: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(repo), *cmd], capture_output=True, text=True, timeout=30,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    changed = git("status", "--porcelain", "--untracked-files=no")
    return dict(commit=commit or git("rev-parse", "HEAD"),
                modified_files=None if changed is None else [ln[3:] for ln in changed.splitlines()])


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what `platform` knows)."""
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), model)
    except OSError:
        pass
    return model


def usable_cpu_count() -> int | None:
    """CPUs this process may run on (its affinity mask): a container or `taskset` can leave fewer than the host's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine() -> dict:
    """CPU, GPU and Python of this host."""
    info = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        python=platform.python_version(),
        platform=platform.platform(),
        cpu_model=cpu_model(),
        cpu_count=os.cpu_count(),
        gpu=None,
    )
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    sms=props.multi_processor_count,
                    cuda=torch.version.cuda, capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    return info
