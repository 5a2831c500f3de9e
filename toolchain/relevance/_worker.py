"""Child process that runs iNNvestigate: the only place eager execution is disabled.

``python -m toolchain.relevance._worker JOB_DIR`` reads ``JOB_DIR/job.json`` (canonical model
path, rule set, batch size), ``JOB_DIR/inputs.npz`` (``x`` and the neuron to explain per sample,
``-1`` for all outputs) and writes ``JOB_DIR/result.npz`` or ``JOB_DIR/error.txt``.

iNNvestigate's ``disable_eager_execution()`` is process-wide and irreversible (TFLite conversion
fails afterwards), hence the separate process. One analyzer is built per model on a fresh graph
and reused across batches: building is the slow part, a batch then costs tens of milliseconds.

Per-weight relevance. Each rule class is wrapped so that, while iNNvestigate reverses the graph,
it records the layer's input activations ``a`` and the relevance ``R`` arriving at its output
(an equivalent per-layer selection to ``reverse_keep_tensors``, which crashes in "index" mode).
For a linear map ``z = lin(a, w) + b`` and a message ``s = R / stab(z)``, the relevance of weight
``w`` summed over output positions and samples is ``w * d/dw sum(lin(a, w) * s)``, which
``tf.gradients`` evaluates for dense, convolution and depthwise convolution alike:
epsilon: ``R_ij = a_i w_ij / (z_j + eps sign(z_j)) R_j``; alpha-beta splits ``a`` and ``w`` into
positive and negative parts (activator and inhibitor terms) exactly as iNNvestigate does.
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback


def _linear_op(layer, tf):
    """The layer's linear map without bias: lin(a, w)."""
    cls = type(layer).__name__
    if cls in ("Conv2D", "Conv1D"):  # Keras' Conv base class: the layer's own convolution
        return lambda a, w: layer.convolution_op(a, w)
    if cls == "DepthwiseConv2D":
        return lambda a, w: tf.keras.backend.depthwise_conv2d(
            a, w, strides=layer.strides, padding=layer.padding,
            data_format=layer.data_format, dilation_rate=layer.dilation_rate)
    if cls == "Dense":
        return lambda a, w: tf.tensordot(a, w, [[a.shape.rank - 1], [0]])
    raise ValueError(f"no linear op for {cls}")


def _kernel(layer):
    return layer.depthwise_kernel if type(layer).__name__ == "DepthwiseConv2D" else layer.kernel


def per_weight_relevance(layer, a, relevance, rule, tf):
    """Graph tensor: per-weight relevance of ``layer`` summed over the batch (kernel shape)."""
    lin = _linear_op(layer, tf)
    w = tf.convert_to_tensor(_kernel(layer))
    bias = tf.convert_to_tensor(layer.bias) if getattr(layer, "use_bias", False) else None
    eps_floatx = tf.keras.backend.epsilon()

    def grad(x, s):  # d/dw sum(lin(x, w) * s): sums a_i * s_j over positions and samples
        return tf.gradients(tf.reduce_sum(lin(x, w) * tf.stop_gradient(s)), w)[0]

    def safe_divide(r, z):  # iNNvestigate's safe_divide
        return r / (z + eps_floatx * tf.cast(tf.equal(z, 0.0), z.dtype))

    def with_bias(z):
        return z + bias if (bias is not None and rule["bias"]) else z

    if rule["kind"] in ("z", "epsilon"):
        z = with_bias(lin(a, w))
        if rule["kind"] == "epsilon":
            sign = tf.cast(tf.greater_equal(z, 0.0), z.dtype) * 2.0 - 1.0
            s = relevance / (z + sign * rule["epsilon"])
        else:
            s = safe_divide(relevance, z)
        return w * grad(a, s)

    # alpha-beta
    wp, wn = w * tf.cast(w > 0, w.dtype), w * tf.cast(w < 0, w.dtype)
    ap, an = a * tf.cast(a > 0, a.dtype), a * tf.cast(a < 0, a.dtype)
    z_act = with_bias(lin(ap, wp) + lin(an, wn))
    s_act = safe_divide(relevance, z_act)
    out = rule["alpha"] * (wp * grad(ap, s_act) + wn * grad(an, s_act))
    if rule["beta"]:
        z_inh = with_bias(lin(ap, wn) + lin(an, wp))
        s_inh = safe_divide(relevance, z_inh)
        out = out - rule["beta"] * (wn * grad(ap, s_inh) + wp * grad(an, s_inh))
    return out


def _innvestigate_rule_class(rule, rrule):
    """The iNNvestigate rule class that computes ``rule`` (a dict of ``Rule`` fields)."""
    if rule["kind"] == "z":
        return rrule.ZRule, {"bias": rule["bias"]}
    if rule["kind"] == "epsilon":
        return rrule.EpsilonRule, {"epsilon": rule["epsilon"], "bias": rule["bias"]}
    return rrule.AlphaBetaRule, {"alpha": rule["alpha"], "beta": rule["beta"], "bias": rule["bias"]}


def run(job_dir: str) -> None:
    with open(os.path.join(job_dir, "job.json")) as f:
        job = json.load(f)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    tf.compat.v1.disable_eager_execution()
    import innvestigate
    import innvestigate.analyzer.relevance_based.relevance_rule as rrule
    from tqdm import tqdm

    t0 = time.perf_counter()
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.models.load_model(job["model_path"], compile=False)
    data = np.load(os.path.join(job_dir, "inputs.npz"))
    x, neurons = data["x"], data["neurons"]
    explain_all = bool(np.all(neurons < 0))
    reference = data["reference_logits"]
    logits = model.predict(x[: len(reference)], verbose=0)
    if not np.allclose(logits, reference, rtol=1e-3, atol=1e-3 * (1 + np.abs(reference).max())):
        raise RuntimeError("the model loaded in graph mode computes other logits than in the parent "
                           f"(max difference {np.abs(logits - reference).max():.3g}); its weights did not load")

    families = job["families"]            # layer class -> family name
    rules = job["rules"]                  # [[family, rule dict], ...] first match wins
    kernel_layers = set(job["kernel_layers"])

    def rule_for(layer):
        cls = type(layer).__name__
        for family, rule in rules:
            if cls in families[family]:
                return rule
        raise ValueError(f"no rule for {layer.name} ({cls})")

    recorded = {}  # canonical layer name -> (a, R_out, R_in)

    def recording(layer_rule):
        base, kwargs = _innvestigate_rule_class(layer_rule, rrule)

        class Recording(base):
            def __init__(self, layer, state):
                super().__init__(layer, state, **kwargs)
                self._recorded_layer = layer

            def apply(self, Xs, Ys, Rs, reverse_state):
                out = super().apply(Xs, Ys, Rs, reverse_state)
                recorded[self._recorded_layer.name] = (Xs[0], Rs[0], out[0])
                return out

        return Recording

    conditions = []
    for layer in model.layers:
        if layer.name in kernel_layers:
            conditions.append(((lambda name: lambda l: l.name == name)(layer.name), recording(rule_for(layer))))
    analyzer = innvestigate.analyzer.LRP(
        model, rule=conditions, disable_model_checks=True,
        neuron_selection_mode="all" if explain_all else "index")
    analyzer.create_analyzer_model()
    missing = kernel_layers - set(recorded)
    if missing:
        raise RuntimeError(f"iNNvestigate never reversed layers {sorted(missing)}")

    names = sorted(recorded)
    by_name = {l.name: l for l in model.layers}
    fetch_weights = [per_weight_relevance(by_name[n], recorded[n][0], recorded[n][1],
                                          rule_for(by_name[n]), tf) for n in names]
    fetch_rout = [tf.reduce_sum(recorded[n][1]) for n in names]
    fetch_rin = [tf.reduce_sum(recorded[n][2]) for n in names]
    fetch_input = analyzer._analyzer_model.outputs[0]
    feeds = analyzer._analyzer_model.inputs
    session = tf.compat.v1.keras.backend.get_session()
    t_build = time.perf_counter() - t0

    totals_w = [None] * len(names)
    totals_out = np.zeros(len(names))
    totals_in = np.zeros(len(names))
    heatmaps = []
    input_totals = []
    batch = int(job["batch_size"])
    n_heatmaps = int(job["heatmaps"])
    t1 = time.perf_counter()
    for start in tqdm(range(0, len(x), batch), desc="LRP", unit="batch", file=sys.stderr,
                      disable=job.get("quiet", False)):
        xb = x[start:start + batch]
        feed = {feeds[0]: xb}
        if not explain_all:
            feed[feeds[1]] = analyzer._get_neuron_selection_array(neurons[start:start + batch], len(xb))
        values = session.run([fetch_input] + fetch_weights + fetch_rout + fetch_rin, feed_dict=feed)
        r_input, rest = values[0], values[1:]
        for i in range(len(names)):
            totals_w[i] = rest[i] if totals_w[i] is None else totals_w[i] + rest[i]
        totals_out += np.asarray(rest[len(names):2 * len(names)], dtype=np.float64)
        totals_in += np.asarray(rest[2 * len(names):], dtype=np.float64)
        input_totals.append(r_input.reshape(len(xb), -1).sum(axis=1))
        if len(heatmaps) < n_heatmaps:
            heatmaps.extend(r_input[: n_heatmaps - len(heatmaps)])
    t_analyze = time.perf_counter() - t1

    result = {f"w/{n}": totals_w[i] for i, n in enumerate(names)}
    if job.get("profile"):
        result["profile"] = _profile(session, feeds, fetch_input, fetch_weights, analyzer, model, x,
                                     neurons, batch, explain_all, tf, np)
    result.update({f"rout/{n}": np.float64(totals_out[i]) for i, n in enumerate(names)})
    result.update({f"rin/{n}": np.float64(totals_in[i]) for i, n in enumerate(names)})
    result["heatmaps"] = np.asarray(heatmaps, dtype=np.float32)
    result["input_relevance_per_sample"] = np.concatenate(input_totals)
    result["timings"] = np.array([t_build, t_analyze])
    tmp = os.path.join(job_dir, "result.tmp.npz")
    np.savez(tmp, **result)
    os.replace(tmp, os.path.join(job_dir, "result.npz"))


def _profile(session, feeds, fetch_input, fetch_weights, analyzer, model, x, neurons, batch,
             explain_all, tf, np, repeats=3):
    """Steady-state seconds per batch (median over batches after a warm-up) of: LRP to the input,
    LRP plus per-weight relevance, and a plain input gradient of the explained logit."""
    logit = model.outputs[0]
    if explain_all:
        target = tf.reduce_sum(logit)
    else:
        sel = tf.compat.v1.placeholder(tf.int32, [None])
        target = tf.reduce_sum(tf.gather(logit, sel, axis=1, batch_dims=1))
    grad = tf.gradients(target, model.inputs[0])[0]

    def timed(fetches, with_indices, gradient):
        times = []
        for r in range(repeats + 1):
            for start in range(0, len(x) - batch + 1, batch):
                xb = x[start:start + batch]
                if gradient:
                    feed = {model.inputs[0]: xb}
                    if not explain_all:
                        feed[sel] = neurons[start:start + batch]
                else:
                    feed = {feeds[0]: xb}
                    if with_indices:
                        feed[feeds[1]] = analyzer._get_neuron_selection_array(neurons[start:start + batch], len(xb))
                t = time.perf_counter()
                session.run(fetches, feed_dict=feed)
                if r > 0:  # the first pass warms up
                    times.append(time.perf_counter() - t)
        return float(np.median(times))

    return np.array([timed(fetch_input, not explain_all, False),
                     timed([fetch_input] + fetch_weights, not explain_all, False),
                     timed(grad, False, True), float(batch)])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job_dir = argv[0]
    try:
        run(job_dir)
    except BaseException:  # reported to the parent, which raises a ToolchainError
        with open(os.path.join(job_dir, "error.txt"), "w") as f:
            f.write(traceback.format_exc())
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
