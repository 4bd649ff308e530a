"""Recipes: YAML lists of named steps. Built-ins live as YAML files next to this module.

A recipe file looks like::

    name: w4a16-g64
    description: what it is for
    calibration: {samples: 128, seq: 512}   # optional; used by steps that need data
    steps:
      - rtn:
          weights: int4:g64:sym

Each step entry is a one-key mapping from a registered step name to its arguments. The whole
recipe is validated (step names, argument names, specs) when it is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bitsmith.errors import BitsmithError, SpecError
from bitsmith.registry import Step, make_step

BUILTIN_DIR = Path(__file__).parent / "builtin"


@dataclass
class Recipe:
    name: str
    description: str
    steps: list[Step]
    raw: dict[str, Any]  # the validated YAML data, saved next to the quantized model
    calibration: dict[str, int] = field(default_factory=dict)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def from_dict(data: Any, default_name: str = "custom") -> Recipe:
    if not isinstance(data, dict):
        raise SpecError("recipe must be a mapping with a 'steps' list")
    unknown = set(data) - {"name", "description", "calibration", "steps"}
    if unknown:
        raise SpecError(f"recipe: unknown key {sorted(unknown)[0]!r}; keys are name, description, calibration, steps")
    steps_data = data.get("steps")
    if not isinstance(steps_data, list) or not steps_data:
        raise SpecError("recipe: 'steps' must be a non-empty list of {step_name: {arguments}}")
    steps = []
    for i, entry in enumerate(steps_data):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise SpecError(f"recipe step #{i + 1}: expected a one-key mapping {{step_name: {{arguments}}}}, got {entry!r}")
        (name, args), = entry.items()
        if args is not None and not isinstance(args, dict):
            raise SpecError(f"recipe step {name!r}: arguments must be a mapping, got {args!r}")
        steps.append(make_step(str(name), args))
    calib = data.get("calibration") or {}
    if not isinstance(calib, dict) or set(calib) - {"samples", "seq"} or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in calib.values()
    ):
        raise SpecError("recipe: 'calibration' must be {samples: N, seq: N} with positive integers")
    name = str(data.get("name") or default_name)
    return Recipe(name, str(data.get("description", "")), steps, data, dict(calib))


def load_recipe(name_or_path: "str | Path | dict | Recipe") -> Recipe:
    """A built-in recipe by name, a YAML file, a dict, or an already loaded recipe."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    if isinstance(name_or_path, dict):
        return from_dict(name_or_path)
    path = Path(name_or_path)
    if not path.suffix and (BUILTIN_DIR / f"{path.name}.yaml").is_file():
        path = BUILTIN_DIR / f"{path.name}.yaml"
    if not path.is_file():
        raise BitsmithError(f"recipe {str(name_or_path)!r} is neither a built-in ({', '.join(builtin_names())}) nor a YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"recipe file {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise SpecError(f"recipe file {path} is not UTF-8 text; save it as UTF-8") from None
    return from_dict(data, default_name=path.stem)
