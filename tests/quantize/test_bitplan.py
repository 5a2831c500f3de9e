"""BitPlan: plain data that round-trips through bitplan.json and can be edited by hand."""
import json

import pytest

from toolchain.errors import ConfigError
from toolchain.quantize.bitplan import BitPlan, LayerBits


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
