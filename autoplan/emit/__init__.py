"""Launch scripts for a plan: torchrun, SLURM, torchtitan (0.3 CLI and 0.1 TOML).

``emit(plan, target, out_dir)`` returns {file name: text}; with ``out_dir`` it also writes
them there, executable, with the plan beside them as ``plan.yaml`` (which the scripts
read). Every value that reaches a shell line is quoted with ``shlex.quote``; the scripts
run under ``set -euo pipefail``.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ..plan import Plan
from .common import PLAN_FILE, layout
from .slurm import slurm_script
from .torchrun import torchrun_script
from .torchtitan import torchtitan_files

TARGETS = ("torchrun", "slurm", "torchtitan")


def emit(plan: Plan, target: str, out_dir: Path | str | None = None,
         plan_path: str | None = None) -> dict[str, str]:
    """Files (name -> text) for ``target``.

    With ``out_dir`` the scripts read ``plan.yaml`` beside them (written there too);
    without it they read ``plan_path`` as given (default ``plan.yaml``).
    """
    if target not in TARGETS:
        raise UsageError(f"--target {target!r}: use one of {', '.join(TARGETS)}")
    layout(plan)  # a plan whose GPUs do not fill whole nodes fails here, once
    beside = out_dir is not None
    if target == "torchrun":
        files = {"torchrun.sh": torchrun_script(plan, None if beside else (plan_path or PLAN_FILE))}
    elif target == "slurm":
        files = {"slurm.sbatch": slurm_script(plan, PLAN_FILE if beside else (plan_path or PLAN_FILE))}
    else:
        files = torchtitan_files(plan)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        plan.save(out / PLAN_FILE)
        for name, text in files.items():
            path = out / name
            path.write_text(text)
            if name.endswith((".sh", ".sbatch")):
                path.chmod(0o755)
    return files


def write_bundle(plan: Plan, out_dir: Path | str) -> list[Path]:
    """The plan and every launch script, in one folder."""
    out = Path(out_dir)
    written = [out / PLAN_FILE]
    for target in TARGETS:
        written += [out / name for name in emit(plan, target, out)]
    return written


__all__ = ["emit", "write_bundle", "TARGETS", "PLAN_FILE"]
