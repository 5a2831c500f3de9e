"""Constraints of a tune: ``flash<=32KB``, ``ram<=20KB``, ``latency<=5ms``, ``instructions<=8M``,
``drop<=1``. Parsed and checked before any work; every bad one is named at once.

* ``flash``: bytes of the artifact that ships: the MCU bundle's flash when the recipe exports
  ``mcu``, else the headline TFLite file (units B, KB = 1000 B, KiB, MB, MiB);
* ``ram``: the MCU bundle's tensor arena (needs ``mcu`` in ``export.formats``);
* ``latency``: p50 of the headline artifact on the target (us, ms, s); not on ``qemu-cortex-m*``
  targets, which count instructions instead;
* ``instructions``: EMULATED INSTRUCTION COUNT per inference on ``qemu-cortex-m*`` (k, M, G);
* ``drop``: the worst compressed artifact's loss against the original in the task's metric, as the
  compress guard measures it, times 100: accuracy points (1 = one point), percent more MSE, or
  ROC AUC x 100.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Dict, Iterable, List, Sequence

from toolchain.errors import ConfigError

#: unit -> factor to the constraint's base unit (bytes, milliseconds, instructions, points)
UNITS: Dict[str, Dict[str, float]] = {
    "flash": {"": 1, "b": 1, "kb": 1e3, "kib": 1024, "mb": 1e6, "mib": 1024 ** 2},
    "ram": {"": 1, "b": 1, "kb": 1e3, "kib": 1024, "mb": 1e6, "mib": 1024 ** 2},
    "latency": {"us": 1e-3, "ms": 1, "s": 1e3},
    "instructions": {"": 1, "k": 1e3, "m": 1e6, "g": 1e9},
    "drop": {"": 1, "points": 1, "%": 1},
}
#: what each constraint limits, in the trial's numbers (``TrialNumbers`` field)
FIELDS = {"flash": "flash_bytes", "ram": "ram_bytes", "latency": "latency_ms",
          "instructions": "instructions", "drop": "drop_points"}
BASE_UNIT = {"flash": "B", "ram": "B", "latency": "ms", "instructions": "instructions", "drop": "points"}
#: targets whose benchmark is an emulated instruction count (deploy/targets/qemu_cortex_m.py)
INSTRUCTION_TARGETS = ("qemu-cortex-m4", "qemu-cortex-m7")
_FORM = re.compile(r"^\s*([a-z_]+)\s*<=\s*([-+]?[0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*([a-z%]*)\s*$", re.I)


@dataclass(frozen=True)
class Constraint:
    name: str      # flash | ram | latency | instructions | drop
    limit: float   # in BASE_UNIT[name]
    text: str      # as the user wrote it

    @property
    def field(self) -> str:
        return FIELDS[self.name]

    def violation(self, value) -> float:
        """0 when met; else how far over the limit, relative to it (``inf`` when not measured)."""
        if value is None:
            return float("inf")
        if value <= self.limit:
            return 0.0
        return (value - self.limit) / max(abs(self.limit), 1e-9)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_constraints(texts: Sequence[str], target: str = "local", formats: Iterable[str] = ()) -> List[Constraint]:
    """``Constraint`` objects from ``NAME<=VALUE[UNIT]`` strings; ``ConfigError`` naming every bad one."""
    formats = list(formats)
    problems, out, seen = [], [], set()
    for text in texts:
        m = _FORM.match(str(text))
        if m is None:
            problems.append(f"{text!r} is not NAME<=VALUE[UNIT] (e.g. flash<=32KB, latency<=5ms, drop<=1)")
            continue
        name, value, unit = m.group(1).lower(), float(m.group(2)), m.group(3).lower()
        if name not in UNITS:
            problems.append(f"{text!r} limits {name!r}, which is not one of {', '.join(UNITS)}")
            continue
        if unit not in UNITS[name]:
            allowed = ", ".join(u for u in UNITS[name] if u) or "none"
            problems.append(f"{text!r} has unit {unit or '(none)'!r}; {name} takes {allowed}")
            continue
        if name in seen:
            problems.append(f"{text!r} limits {name} a second time; give each constraint once")
            continue
        if name != "drop" and value <= 0:
            problems.append(f"{text!r} is not a positive limit")
            continue
        on_mcu = target in INSTRUCTION_TARGETS
        if name == "latency" and on_mcu:
            problems.append(f"{text!r}: {target} measures EMULATED INSTRUCTION COUNTS, not time; "
                            f"use instructions<=N (e.g. instructions<=8M)")
            continue
        if name == "instructions" and not on_mcu:
            problems.append(f"{text!r}: instruction counts come from {' or '.join(INSTRUCTION_TARGETS)}, "
                            f"the target is {target}; use latency<=T or --target qemu-cortex-m4")
            continue
        if name == "ram" and "mcu" not in formats:
            problems.append(f"{text!r}: ram is the MCU bundle's tensor arena and export.formats has no mcu; "
                            "add mcu to the recipe's export.formats")
            continue
        seen.add(name)
        out.append(Constraint(name, value * UNITS[name][unit], str(text).strip()))
    if problems:
        raise ConfigError(f"bad --constraint: {'; '.join(problems)}; see `toolchain tune --help`")
    return out
