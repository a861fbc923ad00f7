"""Extract torchtitan's configuration key names from an unpacked wheel (names only).

    pip download --no-deps torchtitan==0.3.0 -d /tmp/tt && cd /tmp/tt && unzip -q torchtitan-0.3.0-*.whl
    python autoplan/data/torchtitan_keys.py /tmp/tt 0.3.0 > autoplan/data/torchtitan_keys_0.3.0.json

Reads the source with ``ast`` (nothing is imported or copied): the dataclass field names
of each config section, the activation-checkpoint tyro subcommands (0.3), the llama3
config_registry functions (0.3) or flavors (0.1). tests/test_emit.py checks every key
the emitters write against these lists.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path


def _class_fields(path: Path) -> dict[str, list[str]]:
    """Class name (dotted for nested classes, e.g. 'LRSchedulersContainer.Config') -> field names."""
    out: dict[str, list[str]] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in getattr(node, "body", []):
            if isinstance(child, ast.ClassDef):
                name = prefix + child.name
                out[name] = [s.target.id for s in child.body
                             if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
                             and not s.target.id.startswith("_")]
                visit(child, name + ".")

    visit(ast.parse(path.read_text()), "")
    return out


def _dict_keys(path: Path, variable: str) -> list[str]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == variable for t in node.targets):
            if isinstance(node.value, ast.Dict):
                return [k.value for k in node.value.keys if isinstance(k, ast.Constant)]
    return []


def keys_0_1(root: Path) -> dict:
    classes = _class_fields(root / "torchtitan/config_manager.py")
    sections = {}
    for node in ast.walk(ast.parse((root / "torchtitan/config_manager.py").read_text())):
        if isinstance(node, ast.ClassDef) and node.name == "JobConfig":
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.annotation, ast.Name):
                    sections[stmt.target.id] = sorted(classes[stmt.annotation.id])
    return {
        "_source": "torchtitan 0.1.0 wheel from PyPI (June 2025; the earliest release with code: 0.0.2 of "
                   "April 2024 is an empty placeholder). torchtitan/config_manager.py: JobConfig fields = TOML "
                   "sections, their dataclass fields = keys; models/llama3/__init__.py: llama3_configs flavors. "
                   "Field names only, extracted with autoplan/data/torchtitan_keys.py.",
        "_launch": "torchrun ... -m torchtitan.train --job.config_file FILE.toml",
        "llama3_flavors": _dict_keys(root / "torchtitan/models/llama3/__init__.py", "llama3_configs"),
        **dict(sorted(sections.items())),
    }


def keys_0_3(root: Path) -> dict:
    configs = _class_fields(root / "torchtitan/config/configs.py")
    schedulers = _class_fields(root / "torchtitan/components/optimizer/lr_scheduler.py")
    ac_source = (root / "torchtitan/distributed/activation_checkpoint.py").read_text()
    subcommands = []
    for node in ast.walk(ast.parse(ac_source)):
        if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "subcommand"
                and node.args and isinstance(node.args[0], ast.Constant)):
            subcommands.append("activation-checkpoint:" + node.args[0].value)
    registry = ast.parse((root / "torchtitan/models/llama3/config_registry.py").read_text())
    return {
        "_source": "torchtitan 0.3.0 wheel from PyPI: torchtitan/config/configs.py (TrainingConfig, "
                   "ParallelismConfig, DebugConfig), components/optimizer/lr_scheduler.py "
                   "(LRSchedulersContainer.Config), distributed/activation_checkpoint.py (the tyro subcommands "
                   "of Trainer.Config.activation_checkpoint), models/llama3/config_registry.py (--config "
                   "functions); config/manager.py reads --module/--config. Field names only, extracted with "
                   "autoplan/data/torchtitan_keys.py.",
        "_launch": "torchrun ... -m torchtitan.train --module llama3 --config FUNCTION --section.key value ... "
                   "activation-checkpoint:MODE",
        "activation_checkpoint_subcommands": sorted(subcommands),
        "llama3_configs": sorted(f.name for f in registry.body if isinstance(f, ast.FunctionDef)
                                 and not f.name.startswith("_")),
        "debug": sorted(configs["DebugConfig"]),
        "lr_scheduler": sorted(schedulers["LRSchedulersContainer.Config"]),
        "parallelism": sorted(configs["ParallelismConfig"]),
        "training": sorted(configs["TrainingConfig"]),
    }


def main(argv: list[str]) -> int:
    root, version = Path(argv[1]), argv[2]
    data = keys_0_1(root) if version.startswith("0.1") else keys_0_3(root)
    print(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
