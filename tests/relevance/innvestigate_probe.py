"""Run in a child process (iNNvestigate disables eager execution process-wide): probes the
iNNvestigate 2.1.2 behaviours the engine works around, printing one JSON line of findings."""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import tensorflow as tf

tf.compat.v1.disable_eager_execution()
import innvestigate  # noqa: E402


def tiny(depthwise: bool, relu_layer: bool):
    inp = tf.keras.Input((6, 6, 2))
    h = tf.keras.layers.Conv2D(3, 3)(inp)
    if depthwise:
        h = tf.keras.layers.DepthwiseConv2D(2)(h)
    if relu_layer:
        h = tf.keras.layers.ReLU()(h)
    h = tf.keras.layers.Flatten()(h)
    return tf.keras.Model(inp, tf.keras.layers.Dense(3)(h))


findings = {}
for key, (dw, relu) in {"depthwise": (True, False), "relu_layer": (False, True)}.items():
    try:
        innvestigate.create_analyzer("lrp.epsilon", tiny(dw, relu))
        findings[f"checks_refuse_{key}"] = False
    except NotImplementedError:
        findings[f"checks_refuse_{key}"] = True

x = np.random.RandomState(0).randn(2, 6, 6, 2).astype("float32")
analyzer = innvestigate.create_analyzer("lrp.epsilon", tiny(False, False), neuron_selection_mode="index",
                                        reverse_keep_tensors=True)
try:
    analyzer.analyze(x, neuron_selection=[0, 1])
    _ = analyzer._reversed_tensors
    findings["keep_tensors_index_mode_crashes"] = False
except Exception as e:  # the crash's type is an implementation detail
    findings["keep_tensors_index_mode_crashes"] = True
    findings["keep_tensors_error"] = f"{type(e).__name__}: {e}"[:200]
print(json.dumps(findings))
sys.stdout.flush()
