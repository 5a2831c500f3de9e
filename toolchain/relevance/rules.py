"""LRP rules as plain data, and the named rule sets users select.

A ``RuleSet`` is an ordered first-match list of (layer family, ``Rule``) — zennit's
LayerMapComposite. The child process turns each ``Rule`` into the matching iNNvestigate rule class,
and the per-weight decomposition uses the very same formula, so the weight scores add up to the
relevance iNNvestigate propagates through the layer.

Alpha-beta rules ignore the bias (iNNvestigate's ``*IgnoreBias`` variants): its bias-including
variant adds the full bias to both the activator and the inhibitor denominators, which is not the
paper's formula. Epsilon and z keep the bias in the denominator, as in Bach et al. (2015).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Tuple

from toolchain.layers import KERNEL_LAYERS, LAYER_FAMILIES as KERNEL_FAMILIES
from toolchain.registry import Registry

#: named layer families: a rule list entry applies to every class in its family
LAYER_FAMILIES = {**KERNEL_FAMILIES, "Any": tuple(KERNEL_LAYERS)}


@dataclass(frozen=True)
class Rule:
    """One LRP decomposition rule for layers with a kernel."""

    kind: str  # "z" | "epsilon" | "alpha_beta"
    epsilon: float = 0.0
    alpha: float = 1.0
    beta: float = 0.0
    bias: bool = True

    def __post_init__(self):
        if self.kind not in ("z", "epsilon", "alpha_beta"):
            raise ValueError(f"unknown rule kind {self.kind!r}")
        if self.kind == "epsilon" and self.epsilon <= 0:
            raise ValueError("epsilon must be > 0")
        if self.kind == "alpha_beta" and abs(self.alpha - self.beta - 1) > 1e-9:
            raise ValueError("alpha - beta must be 1")

    def describe(self) -> str:
        if self.kind == "epsilon":
            return f"epsilon(eps={self.epsilon:g})"
        if self.kind == "alpha_beta":
            return f"alpha{self.alpha:g}beta{self.beta:g}" + ("" if self.bias else " (bias ignored)")
        return "z"


@dataclass(frozen=True)
class RuleSet:
    name: str
    description: str
    rules: Tuple[Tuple[str, Rule], ...]  # (layer family, rule), first match wins

    def rule_for(self, layer_class: str) -> Rule:
        for family, rule in self.rules:
            if layer_class in LAYER_FAMILIES[family]:
                return rule
        raise ValueError(f"rule set {self.name} has no rule for {layer_class}")

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description,
                "rules": [[family, asdict(rule)] for family, rule in self.rules]}

    @staticmethod
    def from_dict(d: dict) -> "RuleSet":
        return RuleSet(d["name"], d["description"], tuple((f, Rule(**r)) for f, r in d["rules"]))


RULES: Registry[RuleSet] = Registry("LRP rule")

_Z = Rule("z")
_EPS = Rule("epsilon", epsilon=1e-7)
_EPS_01 = Rule("epsilon", epsilon=0.1)
_A1B0 = Rule("alpha_beta", alpha=1.0, beta=0.0, bias=False)
_A2B1 = Rule("alpha_beta", alpha=2.0, beta=1.0, bias=False)

RULES.register("lrp.z", RuleSet("lrp.z", "LRP-0 (z rule) on every layer", (("Any", _Z),)))
RULES.register("lrp.epsilon", RuleSet(
    "lrp.epsilon", "LRP-epsilon (eps=1e-7, iNNvestigate's default) on every layer", (("Any", _EPS),)))
RULES.register("lrp.epsilon_0_1", RuleSet(
    "lrp.epsilon_0_1", "LRP-epsilon with eps=0.1 on every layer", (("Any", _EPS_01),)))
RULES.register("lrp.alpha_1_beta_0", RuleSet(
    "lrp.alpha_1_beta_0", "LRP-alpha1beta0 (z+), bias ignored, on every layer", (("Any", _A1B0),)))
RULES.register("lrp.alpha_2_beta_1", RuleSet(
    "lrp.alpha_2_beta_1", "LRP-alpha2beta1, bias ignored, on every layer", (("Any", _A2B1),)))
RULES.register("lrp.composite", RuleSet(
    "lrp.composite",
    "composite: epsilon (0.1) for Dense, alpha1beta0 for convolutions (iNNvestigate's preset A)",
    (("Dense", _EPS_01), ("Conv", _A1B0))))
RULES.register("lrp.composite_b", RuleSet(
    "lrp.composite_b",
    "composite: epsilon (0.1) for Dense, alpha2beta1 for convolutions (iNNvestigate's preset B)",
    (("Dense", _EPS_01), ("Conv", _A2B1))))

DEFAULT_RULE = "lrp.epsilon"
