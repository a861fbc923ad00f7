"""Options several commands share, defined once and validated at parse time, and the one
place where their names become objects (model, GPU, executor profile, calibration).

Commands call ``resolve_*`` once and hand objects to the core: the planner and the cost
model never see a preset name or a file path.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cost_models.executors import DEFAULT_EXECUTOR, EXECUTOR_PROFILES, ExecutorProfile
from cost_models.specs import GPUSpec, ModelSpec, resolve_model

from ..errors import UsageError
from ..units import MemoryHeadroom, parse_batch_tokens, parse_memory_headroom, parse_seq_len

EXECUTOR_NAMES = tuple(EXECUTOR_PROFILES)


# ------------------------------------------------------------------------------ types


def positive_int(flag: str) -> Callable[[str], int]:
    """argparse ``type=``: an integer >= 1."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
        return value
    parse.__name__ = flag
    return parse


def non_negative_int(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
        return value
    parse.__name__ = flag
    return parse


def positive_seconds(flag: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
        return value
    parse.__name__ = flag
    return parse


def size_type(parser: Callable[..., int], flag: str) -> Callable[[str], int]:
    """argparse ``type=`` for a size read by ``autoplan.units`` (256k, 1M, 1T)."""
    def parse(text: str) -> int:
        try:
            return parser(text, flag=flag)
        except UsageError as error:
            raise argparse.ArgumentTypeError(str(error).removeprefix(f"{flag} ")) from None
    parse.__name__ = flag
    return parse


def _fix(text: str) -> dict[str, Any]:
    from ..fix import parse_fix
    try:
        return parse_fix(text)
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--fix ")) from None


# ------------------------------------------------------------------------------ options


def add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="preset (default llama3-8b) or a Hugging Face config.json")


def add_hardware(parser: argparse.ArgumentParser, gpus_help: str | None = None, with_count: bool = True) -> None:
    parser.add_argument("--gpu", default="auto",
                        help="auto (probe with NVML, else the default preset) or a preset name, e.g. h100, a100, h200")
    if with_count:
        parser.add_argument("--gpus", type=positive_int("--gpus"), default=None,
                            help=gpus_help or "GPU count (default: detected GPUs, else one node of 8)")
    parser.add_argument("--gpus-per-node", type=positive_int("--gpus-per-node"), default=None,
                        help="default: detected, else the GPU preset's node size")


def add_target_seqlen(parser: argparse.ArgumentParser, required: bool = False, help: str | None = None) -> None:
    parser.add_argument("--target-seqlen", type=size_type(parse_seq_len, "--target-seqlen"), default=None,
                        required=required, help=help or "e.g. 128k, 1M, 262144 (k = 1024)")


def add_global_batch_tokens(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--global-batch-tokens", type=size_type(parse_batch_tokens, "--global-batch-tokens"),
                        default=None, help="pin the global batch, e.g. 4M")


def add_executor(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--executor", choices=EXECUTOR_NAMES, default=DEFAULT_EXECUTOR,
                        help="the program that will run the plan (its memory and time profile)")
    parser.add_argument("--calibration", default="default",
                        help="'default': the fit on published runs shipped for this GPU preset, where there is one "
                             "(h100-96gb-500w, a100-sxm-80gb); 'none': the presets' priors; or a file written by "
                             "`autoplan calibrate`")


def add_fix(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    parser.add_argument("--fix", type=_fix, default={},
                        help=help or "pin knobs: tp=8,cp=4,dp_shard=2,local_batch_size=1,cp_impl=...")


def _headroom(text: str) -> MemoryHeadroom:
    try:
        return parse_memory_headroom(text)
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix("--memory-headroom ")) from None


def add_memory_headroom(parser: argparse.ArgumentParser, default: str | None = "5%") -> None:
    parser.add_argument("--memory-headroom", type=_headroom, default=_headroom(default) if default else None,
                        help="memory every GPU keeps free: a share (5%%, the default) or an amount (4GiB); "
                             "the model is a model, the allocator fragments, NCCL grows with communicators")


def add_format(parser: argparse.ArgumentParser, choices: tuple[str, ...]) -> None:
    parser.add_argument("--format", choices=choices, default=choices[0])


# ------------------------------------------------------------------------------ resolution


@dataclass(frozen=True)
class Hardware:
    """The GPU to plan for and how the cluster is laid out, with what was assumed."""

    gpu: GPUSpec
    num_gpus: int | None  # --gpus, else the detected count (None when nothing says)
    gpus_per_node: int
    source: str  # nvml | default | named
    notes: tuple[str, ...]


def resolve_model_arg(args: argparse.Namespace) -> ModelSpec:
    return resolve_model(args.model)


def resolve_hardware_args(args: argparse.Namespace) -> Hardware:
    """``--gpu auto`` probes NVML in every command (falls back to the default preset)."""
    from ..probe import resolve_hardware

    found = resolve_hardware(args.gpu, args.gpus_per_node)
    notes = (found.note,) if found.note else ()
    count = getattr(args, "gpus", None)
    if count is None and found.source == "nvml" and found.gpu_count:
        count = found.gpu_count
    return Hardware(found.gpu, count, args.gpus_per_node or found.gpus_per_node, found.source, notes)


def resolve_executor_args(args: argparse.Namespace, gpu: GPUSpec) -> tuple[GPUSpec, ExecutorProfile, str | None]:
    """(GPU, executor profile) with ``--calibration`` applied, and the calibration's source
    (None: the presets' priors)."""
    from ..calibration.files import resolve_calibration

    return resolve_calibration(gpu, EXECUTOR_PROFILES[args.executor], getattr(args, "calibration", None))


def check_out_dir(flag: str, value: str | None) -> None:
    """``--out DIR`` must be creatable and writable: checked before any work or output."""
    from ..paths import folder_problem

    problem = folder_problem(value) if value else None
    if problem:
        raise UsageError(f"{flag} {value}: {problem}")


def add_slurm(parser: argparse.ArgumentParser) -> None:
    """sbatch settings of the SLURM script (``emit --target slurm``, ``plan --out``)."""
    group = parser.add_argument_group("SLURM script")
    group.add_argument("--time", dest="slurm_time", default="24:00:00", help="sbatch --time (default 24:00:00)")
    group.add_argument("--partition", default=None, help="sbatch --partition (default: the site's)")
    group.add_argument("--account", default=None, help="sbatch --account (default: the user's)")
    group.add_argument("--exclusive", action=argparse.BooleanOptionalAction, default=True,
                       help="whole nodes to the job (default: yes)")
    group.add_argument("--mem", default="0", help="sbatch --mem per node (default 0: all of it)")


def slurm_options(args: argparse.Namespace):
    from ..emit.slurm import SlurmOptions

    options = SlurmOptions(time_limit=args.slurm_time, partition=args.partition, account=args.account,
                           exclusive=args.exclusive, mem=args.mem)
    options.check()
    return options
