"""Launch scripts for a plan: torchrun, SLURM, torchtitan (0.3 CLI and 0.1 TOML).

``emit(plan, target, out_dir)`` returns {file name: text}; with ``out_dir`` it also writes
them there, executable, with the plan beside them as ``plan.yaml`` (which the scripts
read). Every value that reaches a shell line is quoted with ``shlex.quote``; the scripts
run under ``set -euo pipefail``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import UsageError
from ..plan import Plan
from .common import PLAN_FILE, layout
from .slurm import SlurmOptions, slurm_script
from .torchrun import torchrun_script
from .torchtitan import torchtitan_files
from .torchtitan_fit import torchtitan_fit

TORCHTITAN_PLAN_FILE = "plan_torchtitan.yaml"

TARGETS = ("torchrun", "slurm", "torchtitan")


def emit(plan: Plan, target: str, out_dir: Path | str | None = None,
         plan_path: str | None = None, force: bool = False, slurm: SlurmOptions | None = None) -> dict[str, str]:
    """Files (name -> text) for ``target``.

    With ``out_dir`` the scripts read ``plan.yaml`` beside them (written there too);
    without it they read ``plan_path`` as given (default ``plan.yaml``). The SLURM script
    names the plan by absolute path and checks its sha256 (of that file, or of the plan as
    ``Plan.save`` would write it when the file does not exist yet).
    """
    if target not in TARGETS:
        raise UsageError(f"--target {target!r}: use one of {', '.join(TARGETS)}")
    layout(plan)  # a plan whose GPUs do not fill whole nodes fails here, once
    folder = Path(out_dir) if out_dir is not None else None
    beside = folder is not None
    if target == "slurm":
        (slurm or SlurmOptions()).check()  # before anything is written
    if target == "torchtitan":
        fit = torchtitan_fit(plan)
        if fit is not None and not fit.fits and not force:
            raise UsageError(f"torchtitan would not fit this layout: {fit.describe()}; re-plan with "
                             "--executor torchtitan (or `autoplan plan ... --out DIR`, which does), or pass --force")
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        plan.save(folder / PLAN_FILE)
    if target == "torchrun":
        files = {"torchrun.sh": torchrun_script(plan, None if beside else (plan_path or PLAN_FILE))}
    elif target == "slurm":
        path = folder / PLAN_FILE if folder is not None else Path(plan_path or PLAN_FILE)
        text = path.read_bytes() if path.is_file() else plan_text(plan, path)
        files = {"slurm.sbatch": slurm_script(plan, str(path), hashlib.sha256(text).hexdigest(), slurm)}
    else:
        files = torchtitan_files(plan)
    if folder is not None:
        _write(files, folder)
    return files


def plan_text(plan: Plan, path: Path) -> bytes:
    """The bytes ``plan.save(path)`` writes."""
    return (plan.model_dump_json(indent=2) if path.suffix == ".json" else plan.to_yaml()).encode()


def write_bundle(plan: Plan, out_dir: Path | str, torchtitan_plan: Plan | None = None,
                 slurm: SlurmOptions | None = None) -> list[Path]:
    """The plan and every launch script, in one folder.

    The torchtitan files carry ``torchtitan_plan`` (a plan made for torchtitan, saved beside
    as ``plan_torchtitan.yaml``) when the plan itself would not fit as torchtitan runs it;
    with neither fitting, no torchtitan files are written.
    """
    out = Path(out_dir)
    written = [out / PLAN_FILE]
    for target in ("torchrun", "slurm"):
        written += [out / name for name in emit(plan, target, out, slurm=slurm)]
    titan: Plan | None = plan
    fit = torchtitan_fit(plan)
    if fit is not None and not fit.fits:
        titan = torchtitan_plan
    if titan is not None:
        written += [out / name for name in _write(torchtitan_files(titan), out)]
        if titan is not plan:
            titan.save(out / TORCHTITAN_PLAN_FILE)
            written.append(out / TORCHTITAN_PLAN_FILE)
    return written


def _write(files: dict[str, str], out: Path) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = out / name
        path.write_text(text)
        if name.endswith((".sh", ".sbatch")):
            path.chmod(0o755)
    return files


__all__ = ["emit", "write_bundle", "TARGETS", "PLAN_FILE", "SlurmOptions"]
