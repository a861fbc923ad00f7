"""Launch scripts for a plan: torchrun, SLURM, torchtitan (0.3 CLI and 0.1 TOML)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from ..plan import Plan
from .slurm import slurm_script
from .torchrun import torchrun_script
from .torchtitan import torchtitan_files

TARGETS = ("torchrun", "slurm", "torchtitan")
PLAN_FILE = "plan.yaml"


def emit(plan: Plan, target: str, out_dir: Path | None = None, plan_path: str | None = None) -> dict[str, str]:
    """Files (name -> text) for ``target``; written to ``out_dir`` when given."""
    if target not in TARGETS:
        raise UsageError(f"--target {target!r}: use one of {', '.join(TARGETS)}")
    plan_ref = PLAN_FILE if out_dir is not None else (plan_path or PLAN_FILE)
    if target == "torchrun":
        files = {"torchrun.sh": torchrun_script(plan, plan_ref)}
    elif target == "slurm":
        files = {"slurm.sbatch": slurm_script(plan, plan_ref)}
    else:
        files = torchtitan_files(plan)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not (out_dir / PLAN_FILE).exists() or plan_path is None:
            plan.save(out_dir / PLAN_FILE)
        for name, text in files.items():
            path = out_dir / name
            path.write_text(text)
            if name.endswith((".sh", ".sbatch")):
                path.chmod(0o755)
    return files


def write_bundle(plan: Plan, out_dir: Path) -> list[Path]:
    """The plan and every launch script, in one folder."""
    written = [plan.save(out_dir / PLAN_FILE)]
    for target in TARGETS:
        for name in emit(plan, target, out_dir):
            written.append(out_dir / name)
    return written
