"""Where do the artifacts leave the simulation? Each quantized activation of the simulated graph
next to the same tensor inside tflite-mixed and onnx-mixed, layer by layer, on the MLPerf Tiny
DS-CNN (kws01), for one plan of ``quantization_fidelity.py`` (relevance, avg-bits=4, no QAT).

For every activation the simulation quantizes (the model input, each ReLU output, the average
pool; not the classifier's softmax, which the simulation leaves in float) it reports, over the first ``--samples`` evaluation
samples, how many values differ by at least half a step of that tensor's grid and the largest
difference in steps. Differences compound down the network; the first layer that differs is the
one to look at.

The artifacts' intermediate tensors are read where the runtimes keep them: TFLite's interpreter
with ``experimental_preserve_all_tensors=True`` (tensors named ``.../quant_<layer>/...``), ONNX
Runtime with every activation ``DequantizeLinear`` output added as a graph output (tensors named
``<model>/<layer>/<op>``). ``toolchain.run`` (the one runner) returns final outputs only, hence the
runtimes are opened here directly, for this diagnosis alone.

    nice -n 19 python benchmarks/quantization_fidelity_layers.py [--samples 100]

Writes benchmarks/results/quantization_fidelity_layers.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import quantization_fidelity as qf  # noqa: E402

#: a value differs when it is at least this many steps of its tensor's grid away
OFF_STEPS = 0.5


def simulated_tensors(qmodel, x) -> dict:
    """``layer name -> output`` of every layer of the simulated graph on ``x``."""
    import tensorflow as tf

    layers = [l for l in qmodel.layers if not isinstance(l, tf.keras.layers.InputLayer)]
    outs = tf.keras.Model(qmodel.inputs, [l.output for l in layers]).predict(x, verbose=0)
    return {l.name: o for l, o in zip(layers, outs)}


def tflite_tensors(path, x) -> dict:
    """``layer name -> dequantized output`` of every quantized tensor TFLite names after a layer."""
    import tensorflow as tf

    from toolchain.export.flatbuffer import read_flatbuffer

    constant = {t.index for t in read_flatbuffer(Path(path).read_bytes()).tensors if t.is_constant}
    it = tf.lite.Interpreter(str(path), experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    inp = it.get_input_details()[0]
    wanted = {}
    for t in it.get_tensor_details():
        q = t["quantization_parameters"]
        if len(q["scales"]) != 1 or t["dtype"] != np.int8 or t["index"] in constant:
            continue
        first = t["name"].split(";")[0].split("/")
        if len(first) > 1 and (first[1].startswith("quant_") or first[1] == "quantize_layer"):
            layer = first[1]
            # the last tensor named after a layer is its output (after fused activations)
            wanted[layer] = (t["index"], float(q["scales"][0]), int(q["zero_points"][0]))
    values = {k: [] for k in wanted}
    for sample in x:
        feed = sample[None]
        if inp["dtype"] != np.float32:
            s, z = inp["quantization_parameters"]["scales"][0], inp["quantization_parameters"]["zero_points"][0]
            feed = np.clip(np.round(feed / s) + z, -128, 127).astype(inp["dtype"])
        it.set_tensor(inp["index"], feed)
        it.invoke()
        for k, (i, s, z) in wanted.items():
            values[k].append((it.get_tensor(i).astype(np.float64) - z) * s)
    return {k: (np.concatenate(v), wanted[k][1]) for k, v in values.items()}


def onnx_tensors(path, x) -> dict:
    """``layer name -> dequantized activation`` of every activation DequantizeLinear in ONNX."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    dqs = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in inits]
    for n in dqs:
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(n.output[0]))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = session.run([n.output[0] for n in dqs], {session.get_inputs()[0].name: x.astype(np.float32)})
    found = {}
    for n, out in zip(dqs, outs):
        parts = n.input[0].split("/")
        if len(parts) < 3:
            continue
        layer = "quantize_layer" if n.input[0] == proto.graph.input[0].name or "__" in parts[2] else "quant_" + parts[1]
        found[layer] = (out, float(inits[n.input[1]]))
    return found


def _to_nhwc(a, like):
    if a.shape == like.shape:
        return a
    if a.ndim == 4 and np.transpose(a, (0, 2, 3, 1)).shape == like.shape:
        return np.transpose(a, (0, 2, 3, 1))
    return a.reshape(like.shape) if a.size == like.size else None


def compare(sim: dict, art: dict) -> list:
    rows = []
    for layer, ref in sim.items():
        if layer not in art:
            continue
        values, step = art[layer]
        values = _to_nhwc(values, ref)
        if values is None:
            continue
        d = np.abs(values - ref) / step
        rows.append({"tensor": layer, "step": step, "share_off": float(np.mean(d >= OFF_STEPS)),
                     "max_steps": float(d.max())})
    return rows


def main(argv=None) -> int:
    from toolchain.data import load_dataset
    from toolchain.export.onnx_backend import export_onnx_mixed
    from toolchain.export.tflite_mixed import export_tflite_mixed
    from toolchain.model_io import load_model
    from toolchain.quantize import plan_bits, quantize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--kws-model", default=str(qf.DEFAULT_KWS_MODEL))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    model, ds = load_model(args.kws_model), load_dataset("kws01")
    plan = plan_bits(model, ds, "relevance", qf.CANDIDATES, "avg-bits=4",
                     calibration_samples=qf.CALIBRATION_SAMPLES, quiet=True)
    result = quantize(model, plan, ds, calibration_samples=qf.CALIBRATION_SAMPLES, quiet=True)
    calib, _ = ds.calibration(qf.CALIBRATION_SAMPLES)
    x = np.asarray(ds.x_eval[:args.samples], dtype=np.float32)
    sim = simulated_tensors(result.model, x)
    # the classifier's output: the simulation's is the float softmax, the files' a quantized one
    for layer in result.model.layers:
        activation = getattr(getattr(layer, "layer", None), "activation", None)
        if "softmax" in repr(getattr(activation, "activation", activation)).lower():
            sim.pop(layer.name, None)
    with tempfile.TemporaryDirectory() as tmp:
        tfl = export_tflite_mixed(model, plan, Path(tmp) / "m.tflite", calib, qat_model=result.model)
        onx = export_onnx_mixed(model, calib, plan, Path(tmp) / "m.onnx", qat_model=result.model)
        found = {"tflite-mixed": tflite_tensors(tfl.path, x), "onnx-mixed": onnx_tensors(onx.path, x)}
    rows = {fmt: compare(sim, art) for fmt, art in found.items()}
    results = {"command": "python benchmarks/quantization_fidelity_layers.py "
                          + " ".join(argv if argv is not None else sys.argv[1:]),
               "plan": "ds_cnn relevance avg-bits=4, no QAT", "samples": int(len(x)),
               "simulated_accuracy": result.accuracy, "rows": rows, "seconds": time.perf_counter() - t0}
    md = ["# Quantization fidelity, layer by layer: DS-CNN, relevance avg-bits=4, no QAT", "",
          f"Command: `{results['command'].strip()}`; nice 19 on a shared 2-core machine. The first "
          f"{len(x)} kws01 evaluation samples; per tensor, the share of values at least {OFF_STEPS} steps "
          "of its grid from the simulation's, and the largest difference in steps. Differences compound: "
          "each row is fed the previous rows' artifact values.", "",
          "| tensor | step | tflite-mixed: share off | max steps | onnx-mixed: share off | max steps |",
          "|---|---:|---:|---:|---:|---:|"]
    onnx_rows = {r["tensor"]: r for r in rows["onnx-mixed"]}
    for r in rows["tflite-mixed"]:
        o = onnx_rows.get(r["tensor"])
        md.append(f"| {r['tensor']} | {r['step']:.5f} | {r['share_off']:.2%} | {r['max_steps']:.1f} | "
                  + (f"{o['share_off']:.2%} | {o['max_steps']:.1f} |" if o else "not found | |"))
    md += ["", f"Total: {results['seconds'] / 60:.1f} min."]
    qf.RESULTS.mkdir(parents=True, exist_ok=True)
    (qf.RESULTS / "quantization_fidelity_layers.json").write_text(json.dumps(results, indent=2, default=str))
    (qf.RESULTS / "quantization_fidelity_layers.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
