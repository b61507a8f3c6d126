"""Where a benchmark's numbers come from: the commit, the files that differed from it, the machine.

Every benchmark that writes a result JSON records ``provenance()`` in it, so that anyone can tell which
code produced a table and remake it (``git checkout <commit>`` and the JSON's command).
"""

import os
import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit() -> str | None:
    """HEAD of the checkout the benchmark runs from (None outside a git checkout)."""
    return _git("rev-parse", "HEAD").strip() or None


def changed_files() -> list[str]:
    """Tracked files that differ from the commit: the run measured them, not the commit's (result
    files under benchmarks/results/, which runs write, left out)."""
    lines = _git("status", "--porcelain", "--untracked-files=no").splitlines()
    return [f for f in (line[3:] for line in lines if line.strip()) if not f.startswith("benchmarks/results/")]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict:
    """The commit (and any uncommitted change), CPU model, ATen code path, threads and versions."""
    return {
        "commit": git_commit(),
        "uncommitted_changes": changed_files(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_num_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "python": platform.python_version(),
    }
