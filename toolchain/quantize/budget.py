"""Weight-bit budgets: ``avg-bits=4``, ``size-kb=12`` or ``bits=90000``.

A budget counts packed kernel weight bits only: nonzero weights x their width. Pruned weights
(exact zeros) cost nothing; per-channel scales and biases are overhead, reported beside the
budget by ``toolchain.quantize.size`` but never counted in it. ``size-kb`` uses 1 KB = 1024 bytes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from toolchain.errors import ConfigError

BUDGET_KINDS = ("avg-bits", "size-kb", "bits")
_EXAMPLES = "avg-bits=4, size-kb=12 or bits=90000"


@dataclass(frozen=True)
class Budget:
    kind: str      # one of BUDGET_KINDS
    value: float

    def total_bits(self, nonzero_weights: int) -> int:
        """The budget in packed weight bits for a model with ``nonzero_weights`` nonzero weights."""
        if self.kind == "avg-bits":
            return int(math.floor(self.value * nonzero_weights + 1e-9))
        if self.kind == "size-kb":
            return int(math.floor(self.value * 1024 * 8 + 1e-9))
        return int(self.value)

    def __str__(self) -> str:
        v = int(self.value) if float(self.value).is_integer() else self.value
        return f"{self.kind}={v}"


def parse_budget(text: "str | Budget | None") -> "Budget | None":
    """``avg-bits=4`` / ``size-kb=12`` / ``bits=N`` -> ``Budget`` (None stays None)."""
    if text is None or isinstance(text, Budget):
        return text
    kind, sep, value = str(text).strip().partition("=")
    kind = kind.strip().lower().replace("_", "-")
    if kind == "total-bits":
        kind = "bits"
    if not sep or kind not in BUDGET_KINDS:
        raise ConfigError(f"budget {text!r} is not understood; allowed: {_EXAMPLES}")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"budget {text!r} has a non-numeric value; pass e.g. {_EXAMPLES}") from None
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"budget {text!r} must be a positive number; pass e.g. {_EXAMPLES}")
    if kind == "bits" and not number.is_integer():
        raise ConfigError(f"budget {text!r} must be a whole number of bits; pass e.g. bits=90000")
    return Budget(kind, number)


def parse_bits(text: "str | list | tuple") -> tuple:
    """``"2,4,8"`` (or a sequence) -> (2, 4, 8); an empty list is refused by the allocators."""
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [t for t in str(text).replace(" ", "").split(",") if t]
    try:
        return tuple(int(b) for b in items)
    except (TypeError, ValueError):
        raise ConfigError(f"bit widths {text!r} are not integers; pass e.g. --bits 2,4,8") from None
