"""A slow, independent LRP in float64 numpy, written straight from the formulas (Bach et al. 2015,
Montavon et al. 2019), for checking the engine. Supports Dense, Conv1D, Conv2D and DepthwiseConv2D
with stride 1 and 'valid' padding, ReLU/linear activations and Flatten — enough for small test nets.
A Conv1D over (T, C) is the Conv2D of its (1, k, cin, cout) kernel over the (1, T, C) image: the
same sums of a_i w_ij, so the same formulas.

For every linear layer z_j = sum_i a_i w_ij + b_j the relevance R_j at its output is split into
messages R_ij; per-weight relevance is the message summed over positions and samples.
  epsilon:    R_ij = a_i w_ij / (z_j + eps * sign(z_j)) * R_j          (sign(0) = +1)
  alpha-beta: R_ij = (alpha (a_i w_ij)^+ / z_j^+ - beta (a_i w_ij)^- / z_j^-) * R_j  (bias ignored)
"""
from __future__ import annotations

import numpy as np


def _contributions(layer_class, a, w):
    """c[n, out..., in...]: every a_i * w_ij term, laid out so sum over the 'in' axes gives z."""
    if layer_class == "Dense":
        return a[:, :, None] * w[None, :, :]  # n, i, j
    n, h, wd, cin = a.shape
    kh, kw = w.shape[:2]
    oh, ow = h - kh + 1, wd - kw + 1
    if layer_class == "Conv2D":
        cout = w.shape[-1]
        c = np.zeros((n, oh, ow, kh, kw, cin, cout))
        for y in range(oh):
            for x in range(ow):
                c[:, y, x] = a[:, y:y + kh, x:x + kw, :, None] * w[None]
        return c
    mult = w.shape[-1]  # DepthwiseConv2D: output channel c * mult + m reads input channel c only
    c = np.zeros((n, oh, ow, kh, kw, cin, mult))
    for y in range(oh):
        for x in range(ow):
            c[:, y, x] = a[:, y:y + kh, x:x + kw, :, None] * w[None]
    return c


def _forward(layer_class, a, w, b):
    c = _contributions(layer_class, a, w)
    if layer_class == "Dense":
        return c.sum(axis=1) + b
    z = c.sum(axis=(3, 4, 5)) if layer_class == "Conv2D" else c.sum(axis=(3, 4))
    if layer_class == "DepthwiseConv2D":
        z = z.reshape(z.shape[0], z.shape[1], z.shape[2], -1)
    return z + b


def _messages(layer_class, a, w, b, r_out, rule):
    """Per-message relevance R_ij with the same layout as ``_contributions``."""
    c = _contributions(layer_class, a, w)
    if layer_class == "Dense":
        r = r_out[:, None, :]
        sum_axes = (1,)
    elif layer_class == "Conv2D":
        r = r_out[:, :, :, None, None, None, :]
        sum_axes = (3, 4, 5)
    else:
        n, oh, ow, _ = r_out.shape
        r = r_out.reshape(n, oh, ow, 1, 1, w.shape[2], w.shape[3])
        sum_axes = (3, 4)

    def expand(z):
        if layer_class == "Dense":
            return z[:, None, :]
        if layer_class == "Conv2D":
            return z[:, :, :, None, None, None, :]
        return z[:, :, :, None, None, :, :]  # (n, oh, ow, cin, mult)

    def total(t):
        s = t.sum(axis=sum_axes)
        return s

    def safe_ratio(num, den):
        den_e = expand(den)
        return np.where(den_e == 0, 0.0, num / np.where(den_e == 0, 1.0, den_e))

    if rule["kind"] == "epsilon":
        z = total(c) + (b if layer_class != "DepthwiseConv2D" else b.reshape(w.shape[2], w.shape[3]))
        stab = z + rule["epsilon"] * np.where(z >= 0, 1.0, -1.0)
        return c / expand(stab) * r
    cp, cn = np.maximum(c, 0), np.minimum(c, 0)
    return (rule["alpha"] * safe_ratio(cp, total(cp)) - rule["beta"] * safe_ratio(cn, total(cn))) * r


def reference_relevance(layers, x, neurons, rule):
    """LRP of a sequential net. ``layers``: list of (class, kernel, bias, activation) or
    ("Flatten",). Returns (per-weight relevance per kernel layer index, input relevance)."""
    conv1d = {i for i, spec in enumerate(layers) if spec[0] == "Conv1D"}
    if conv1d:
        as_2d = [("Conv2D", spec[1][None], *spec[2:]) if i in conv1d else spec for i, spec in enumerate(layers)]
        per_weight, r = reference_relevance(as_2d, x[:, None], neurons, rule)
        return {i: (w[0] if i in conv1d else w) for i, w in per_weight.items()}, r[:, 0]
    acts = [x.astype(np.float64)]
    for spec in layers:
        a = acts[-1]
        if spec[0] == "Flatten":
            acts.append(a.reshape(len(a), -1))
            continue
        cls, w, b, act = spec
        z = _forward(cls, a, w.astype(np.float64), b.astype(np.float64))
        acts.append(np.maximum(z, 0) if act == "relu" else z)
    logits = acts[-1]
    r = np.zeros_like(logits)
    r[np.arange(len(x)), neurons] = logits[np.arange(len(x)), neurons]
    per_weight = {}
    for idx in reversed(range(len(layers))):
        spec, a = layers[idx], acts[idx]
        if spec[0] == "Flatten":
            r = r.reshape(a.shape)
            continue
        cls, w, b, _ = spec
        m = _messages(cls, a, w.astype(np.float64), b.astype(np.float64), r, rule)
        if cls == "Dense":
            per_weight[idx] = m.sum(axis=0)
            r = m.sum(axis=2)
        else:
            per_weight[idx] = m.sum(axis=(0, 1, 2))
            kh, kw = w.shape[:2]
            r_in = np.zeros_like(a)
            oh, ow = m.shape[1], m.shape[2]
            msg_in = m.sum(axis=-1)  # sum over outputs j (Conv2D: cout; depthwise: multiplier)
            for y in range(oh):
                for xx in range(ow):
                    r_in[:, y:y + kh, xx:xx + kw, :] += msg_in[:, y, xx]
            r = r_in
    return per_weight, r
