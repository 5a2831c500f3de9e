"""BitPlan: plain data that round-trips through bitplan.json and can be edited by hand."""
import json

import pytest

from toolchain.errors import ConfigError
from toolchain.quantize.bitplan import BitPlan, LayerBits, keep_float


def _plan():
    return BitPlan({"conv": LayerBits(8, 8, (2, 8, 4), 8, 20, 720),
                    "fc": LayerBits(4, 16, None, None, 10, 640)},
                   "quant.relevance", "avg-bits=4", "group", {"solver": "exact DP", "objective": 1.5})


def test_round_trip(tmp_path):
    plan = _plan()
    path = plan.save(tmp_path / "bitplan.json")
    assert BitPlan.load(path) == plan
    assert BitPlan.load(path).layers["conv"].channel_bits() == (2,) * 8 + (8,) * 8 + (4,) * 4


def test_hand_edit(tmp_path):
    path = _plan().save(tmp_path / "bitplan.json")
    data = json.loads(path.read_text())
    data["layers"]["fc"]["weight_bits"] = 2
    path.write_text(json.dumps(data))
    assert BitPlan.load(path).layers["fc"].weight_bits == 2
    data["layers"]["fc"]["weight_bits"] = 1
    data["layers"]["conv"]["activation_bits"] = 12
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"conv: activation bits 12.*fc: weight bits \[1\]"):
        BitPlan.load(path)


def test_malformed(tmp_path):
    p = tmp_path / "bitplan.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        BitPlan.load(p)
    with pytest.raises(ConfigError, match="does not exist"):
        BitPlan.load(tmp_path / "none.json")


class _Layer:
    def __init__(self, name):
        self.name = name


class Conv2D(_Layer):  # a stand-in named like the Keras class: the first kernel is a 1-channel conv
    input_shape = (None, 8, 8, 1)


class Dense(_Layer):
    input_shape = (None, 64)


class _Model:
    layers = [_Layer("input"), Conv2D("conv"), _Layer("relu"), Dense("fc")]


class _MLP:
    layers = [_Layer("input"), Dense("conv"), Dense("fc")]


def test_keep_float_first_only_where_int8_is_slower():
    # "first" exists for XNNPACK's slow int8 conv over one input channel; an MLP's first Dense is
    # faster in int8, so nothing stays float and the plan's notes say why
    kept = keep_float(_plan(), _MLP(), ["first"])
    assert kept.notes["float_layers"] == [] and kept.layers["conv"] == _plan().layers["conv"]
    assert "faster in int8" in kept.notes["float_layers_skipped"]


def test_keep_float_first_and_named_layers():
    plan = _plan()
    first = keep_float(plan, _Model(), ["first"])
    assert first.layers["conv"] == LayerBits(32, 32, None, None, 20, 720)  # groups dropped: all float
    assert first.layers["fc"] == plan.layers["fc"]
    assert first.notes["float_layers"] == ["conv"] and first.notes["solver"] == "exact DP"
    both = keep_float(plan, _Model(), ["fc", "first", "fc"])
    assert both.notes["float_layers"] == ["fc", "conv"]
    assert both.layers["fc"].weight_bits == both.layers["fc"].activation_bits == 32
    assert keep_float(plan, _Model(), []) is plan
    with pytest.raises(ConfigError, match="'dense' are not kernel layers of the model; use 'first' or one of: conv, fc"):
        keep_float(plan, _Model(), ["dense"])
