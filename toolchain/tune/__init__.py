"""``toolchain tune``: find the best recipe for a device.

Searches recipes (pruning sparsity, granularity, channel multiple and criterion; the bit allocator,
candidate widths, budget and float layers; the distillation cap; the target's kernels) with Ray
Tune and Optuna's TPE; every trial is a ``toolchain compress`` run sharing the stage cache. The
result is the Pareto front of size, the task's metric and latency (emulated instruction counts on
``qemu-cortex-m*``) under the user's constraints, and the best recipe as YAML that ``toolchain
compress --recipe`` takes as is. Ray is imported only when a search runs.
"""
from toolchain.tune.constraints import Constraint, parse_constraints


def tune(*args, **kwargs):
    """See :func:`toolchain.tune.search.tune`."""
    from toolchain.tune.search import tune as run

    return run(*args, **kwargs)


__all__ = ["Constraint", "parse_constraints", "tune"]
