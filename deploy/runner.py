#!/usr/bin/env python3
"""Measure one ``.tflite`` or ``.onnx`` artifact on the machine this runs on; print JSON.

This file is copied to the device and run there on its own, so it imports nothing from the
toolchain and needs only numpy plus one runtime:

- ``.tflite``: ``ai_edge_litert`` (``pip install ai-edge-litert``), else ``tflite_runtime``, else
  TensorFlow's ``tf.lite`` as a development fallback (reported as ``"fallback": true``);
- ``.onnx``: ``onnxruntime``;
- ``.tflite`` with ``--runtime tflite_micro``: tflite-micro's interpreter (``pip install
  tflite-micro``; its reference kernels, one sample per invoke), what the MCU check runs.

    python3 runner.py --artifact model.tflite --inputs inputs.npz --runs 200 --threads 1 \
        --xnnpack off

It loads the artifact, warms up, runs ``--runs`` timed single-sample inferences cycling through
the inputs, then one untimed pass over every input for accuracy, and prints one JSON object on the
last line of stdout: load time, p50/p90/p99 latency (ms), throughput, peak RSS, threads, XNNPACK,
runtime name and version, machine, and accuracy when the inputs carry labels.

Inputs are an ``.npz`` with ``x`` (N samples, no batch axis or with it folded into N), optional
``y`` (int class indices) and optional ``x_quantization`` ([scale, zero_point] that maps int ``x``
to float). Float ``x`` fed to an int8/uint8 model is quantized with the model's own input scale and
zero point; int8 outputs are dequantized with the output's. Without ``--inputs`` the runner feeds
seeded random inputs of the model's shape (no accuracy).

Failures print a JSON object with an ``error`` kind instead and exit 3 (a runtime is missing:
``install`` says what to ``pip install``) or 2 (bad artifact or inputs).

The same backends are the toolchain's one way to run an artifact (verification, the MCU check,
benchmarks): ``infer(backend, x)`` runs a whole batch of samples, quantizing float inputs and
dequantizing integer outputs with the model's own scale and zero point, and
``TFLiteBackend(..., reference_kernels=True)`` selects TFLite's reference kernels.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time

try:  # numpy is the one hard dependency; its absence is reported like a missing runtime
    import numpy as np
except ImportError:  # pragma: no cover - exercised on devices without numpy
    np = None

try:
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None

SCHEMA = "toolchain.bench.runner.v1"
EXIT_ERROR = 2
EXIT_MISSING_RUNTIME = 3
# What to install on a device; the pins are the ones the toolchain is tested with.
PIP_NUMPY = "numpy<2"
PIP_TFLITE = "ai-edge-litert==1.4.0"
PIP_ONNX = "onnxruntime==1.31.1"
PIP_MICRO = "tflite-micro"
TFLITE_RUNTIMES = ("ai_edge_litert", "tflite_runtime", "tensorflow")
ONNX_RUNTIMES = ("onnxruntime",)
#: tflite-micro's interpreter on this host (its reference kernels); only when asked for by name
MICRO_RUNTIMES = ("tflite_micro",)
DEFAULT_RUNS = 100
DEFAULT_WARMUP = 10
RANDOM_SAMPLES = 16
PERCENTILES = (50, 90, 99)
#: samples per invoke when ``infer`` runs a whole array (a fixed batch dimension wins)
INFER_BATCH = 64


class RunnerError(Exception):
    """A failure the runner reports as JSON: ``kind`` is missing_runtime, artifact or inputs."""

    def __init__(self, kind: str, message: str, install: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.install = install

    def as_json(self) -> dict:
        out = {"schema": SCHEMA, "error": self.kind, "message": str(self)}
        if self.install:
            out["install"] = self.install
        return out


# --------------------------------------------------------------------------------------------
# Runtimes


def _dist_version(dist: str, module) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return str(getattr(module, "__version__", "unknown"))


def import_tflite(preferred: str | None = None):
    """Return ``(Interpreter, OpResolverType, runtime_info)`` of the first TFLite runtime found."""
    if preferred and preferred not in TFLITE_RUNTIMES:
        raise RunnerError("usage", f"--runtime {preferred!r} cannot run .tflite; use one of "
                                   f"{', '.join(TFLITE_RUNTIMES + MICRO_RUNTIMES)}")
    tried = []
    for name in (preferred,) if preferred else TFLITE_RUNTIMES:
        try:
            if name == "ai_edge_litert":
                from ai_edge_litert import interpreter as mod

                info = {"name": name, "version": _dist_version("ai-edge-litert", mod)}
                return mod.Interpreter, mod.OpResolverType, dict(info, fallback=False)
            if name == "tflite_runtime":
                from tflite_runtime import interpreter as mod

                info = {"name": name, "version": _dist_version("tflite-runtime", mod)}
                return mod.Interpreter, mod.OpResolverType, dict(info, fallback=False)
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            import tensorflow as tf

            info = {"name": "tensorflow.lite", "version": tf.__version__, "fallback": True}
            return tf.lite.Interpreter, tf.lite.experimental.OpResolverType, info
        except ImportError as e:
            tried.append(f"{name}: {e}")
    raise RunnerError(
        "missing_runtime",
        f"no TFLite runtime on this machine (tried {'; '.join(tried)}); install one with "
        f"`python3 -m pip install '{PIP_NUMPY}' {PIP_TFLITE}`",
        install=f"python3 -m pip install '{PIP_NUMPY}' {PIP_TFLITE}")


def import_onnxruntime(preferred: str | None = None):
    if preferred and preferred not in ONNX_RUNTIMES:
        raise RunnerError("usage", f"--runtime {preferred!r} cannot run .onnx; use onnxruntime")
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise RunnerError(
            "missing_runtime",
            f"onnxruntime is not installed on this machine ({e}); install it with "
            f"`python3 -m pip install '{PIP_NUMPY}' {PIP_ONNX}`",
            install=f"python3 -m pip install '{PIP_NUMPY}' {PIP_ONNX}") from None
    return ort, {"name": "onnxruntime", "version": ort.__version__, "fallback": False}


class _CapturedStderr:
    """Collect what native code writes to file descriptor 2 (TFLite logs the XNNPACK delegate
    there), then echo it so nothing is hidden from the user."""

    def __enter__(self):
        import tempfile

        sys.stderr.flush()
        self._file = tempfile.TemporaryFile()
        self._saved = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        self.text = ""
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", "replace")
        self._file.close()
        if self.text:
            sys.stderr.write(self.text)
            sys.stderr.flush()
        return False


def _io_spec(name, dtype, shape, quantization=None) -> dict:
    q = None
    if quantization is not None:
        scale, zero_point = float(quantization[0]), int(quantization[1])
        q = [scale, zero_point] if scale > 0 else None
    return {"name": str(name), "dtype": np.dtype(dtype).name,
            "shape": [d if isinstance(d, int) else None for d in shape], "quantization": q}


class TFLiteBackend:
    """One TFLite interpreter; ``xnnpack=False`` selects the builtin kernels without delegates,
    ``reference_kernels=True`` TFLite's reference kernels (what tflite-micro's are checked against).

    ``path`` is a file or the ``.tflite`` bytes themselves."""

    format = "tflite"

    def __init__(self, path, threads: int, xnnpack: bool = True, runtime: str | None = None,
                 reference_kernels: bool = False):
        t0 = time.perf_counter()
        Interpreter, OpResolverType, self.runtime = import_tflite(runtime)
        self.import_ms = (time.perf_counter() - t0) * 1e3
        given = isinstance(path, (bytes, bytearray))
        shown = "the given .tflite bytes" if given else repr(path)
        kwargs = {"model_content": bytes(path)} if given else {"model_path": path}
        kwargs["num_threads"] = threads
        if reference_kernels:
            kwargs["experimental_op_resolver_type"] = OpResolverType.BUILTIN_REF
        elif not xnnpack:
            kwargs["experimental_op_resolver_type"] = \
                OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        t0 = time.perf_counter()
        with _CapturedStderr() as log:
            try:
                self.interpreter = Interpreter(**kwargs)
                inputs = self.interpreter.get_input_details()
                if len(inputs) == 1 and len(inputs[0]["shape"]) and inputs[0]["shape"][0] != 1:
                    # measure single-sample inference
                    shape = [1] + list(inputs[0]["shape"][1:])
                    self.interpreter.resize_tensor_input(inputs[0]["index"], shape)
                self.interpreter.allocate_tensors()
            except (ValueError, RuntimeError) as e:
                raise RunnerError(
                    "artifact", f"cannot load {shown} with {self.runtime['name']} "
                                f"{self.runtime['version']}: {e}; if an operator is unsupported, "
                                "a newer runtime may have it") from None
        if len(inputs) != 1:
            raise RunnerError("artifact", f"{shown} has {len(inputs)} inputs; the runner feeds "
                                          "exactly one input tensor")
        self.load_ms = (time.perf_counter() - t0) * 1e3
        self.xnnpack = bool(xnnpack) and not reference_kernels
        self.reference_kernels = bool(reference_kernels)
        # TFLite logs "Created TensorFlow Lite XNNPACK delegate" when the delegate is applied;
        # without the line we cannot tell, so say unknown rather than guess.
        self.xnnpack_applied = ("XNNPACK delegate" in log.text) if self.xnnpack else False
        if self.xnnpack and not self.xnnpack_applied:
            self.xnnpack_applied = None
        self._in = self.interpreter.get_input_details()[0]
        self._out = self.interpreter.get_output_details()[0]
        self.input = _io_spec(self._in["name"], self._in["dtype"], self._in["shape"].tolist(),
                              self._in["quantization"])
        self.output = _io_spec(self._out["name"], self._out["dtype"],
                               self._out["shape"].tolist(), self._out["quantization"])
        self.threads = threads
        self.fixed_batch = None  # TFLite resizes the batch axis of any input
        self._batch = int(self._in["shape"][0]) if len(self._in["shape"]) else None

    def predict(self, x):
        """Raw outputs for ``x`` (a batch of any size in the input's dtype)."""
        if len(self._in["shape"]) and len(x) != self._batch:
            shape = [len(x)] + list(self._in["shape"][1:])
            self.interpreter.resize_tensor_input(self._in["index"], shape, strict=False)
            self.interpreter.allocate_tensors()
            self._in = self.interpreter.get_input_details()[0]
            self._out = self.interpreter.get_output_details()[0]
            self._batch = len(x)
        self.interpreter.set_tensor(self._in["index"], x)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self._out["index"])


def import_tflite_micro():
    try:
        from tflite_micro.python.tflite_micro import runtime as mod
    except ImportError as e:
        raise RunnerError(
            "missing_runtime",
            f"tflite-micro is not installed on this machine ({e}); install it with "
            f"`python3 -m pip install '{PIP_NUMPY}' {PIP_MICRO}`",
            install=f"python3 -m pip install '{PIP_NUMPY}' {PIP_MICRO}") from None
    return mod, {"name": "tflite_micro", "version": _dist_version("tflite-micro", mod),
                 "fallback": False}


class MicroBackend:
    """tflite-micro's C++ interpreter with its reference kernels (the code a microcontroller build
    compiles) on this host, one sample per invoke; ``path`` is a file or the ``.tflite`` bytes."""

    format = "tflite"

    def __init__(self, path, threads: int = 1, xnnpack=None, runtime: str | None = None,
                 arena_size: int | None = None, name: str | None = None):
        t0 = time.perf_counter()
        mod, self.runtime = import_tflite_micro()
        self.import_ms = (time.perf_counter() - t0) * 1e3
        given = isinstance(path, (bytes, bytearray))
        shown = name or ("the given .tflite bytes" if given else repr(path))
        t0 = time.perf_counter()
        try:
            data = bytes(path) if given else open(path, "rb").read()
            kwargs = {} if arena_size is None else {"arena_size": int(arena_size)}
            self.interpreter = mod.Interpreter.from_bytes(data, **kwargs)
        except (OSError, RuntimeError, ValueError) as e:
            raise RunnerError("artifact", f"tflite-micro cannot load {shown} ({e}); the graph uses "
                                          "something tflite-micro lacks") from None
        self.load_ms = (time.perf_counter() - t0) * 1e3

        def spec(name, d):
            q = d["quantization_parameters"]
            grid = (q["scales"][0], q["zero_points"][0]) if len(q["scales"]) == 1 else None
            return _io_spec(name, d["dtype"], [int(v) for v in d["shape"]], grid)

        self.input = spec("input", self.interpreter.get_input_details(0))
        self.output = spec("output", self.interpreter.get_output_details(0))
        self._shape = tuple(self.input["shape"])
        self.fixed_batch = 1
        self.xnnpack = None
        self.xnnpack_applied = None
        self.reference_kernels = True
        self.threads = 1

    def predict(self, x):
        self.interpreter.set_input(np.asarray(x).reshape(self._shape), 0)
        self.interpreter.invoke()
        return np.array(self.interpreter.get_output(0))


_ORT_TYPES = {"tensor(float)": "float32", "tensor(double)": "float64",
              "tensor(float16)": "float16", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
              "tensor(int32)": "int32", "tensor(int64)": "int64"}


class OnnxBackend:
    """One ONNX Runtime CPU session with ``threads`` intra-op threads, run sequentially."""

    format = "onnx"

    def __init__(self, path: str, threads: int, xnnpack=None, runtime: str | None = None):
        t0 = time.perf_counter()
        ort, self.runtime = import_onnxruntime(runtime)
        self.import_ms = (time.perf_counter() - t0) * 1e3
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3
        t0 = time.perf_counter()
        try:
            self.session = ort.InferenceSession(path, sess_options=so,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise RunnerError("artifact", f"cannot load {path!r} as an ONNX model: {e}") from None
        self.load_ms = (time.perf_counter() - t0) * 1e3
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise RunnerError("artifact", f"{path!r} has {len(inputs)} inputs; the runner feeds "
                                          "exactly one input tensor")
        self._in_name, self._out_name = inputs[0].name, outputs[0].name

        for arg in (inputs[0], outputs[0]):
            if arg.type not in _ORT_TYPES:
                raise RunnerError("artifact", f"{path!r} tensor {arg.name!r} has type {arg.type};"
                                              f" the runner handles {', '.join(_ORT_TYPES)}")
        integer = [a.name for a in (inputs[0], outputs[0]) if _ORT_TYPES[a.type][0] in "iu"]
        grids = _qdq_grids(path, integer) if integer else {}

        def spec(arg):
            shape = [1 if i == 0 else d for i, d in enumerate(arg.shape)]
            return _io_spec(arg.name, _ORT_TYPES[arg.type], shape, grids.get(arg.name))

        self.input, self.output = spec(inputs[0]), spec(outputs[0])
        batch = inputs[0].shape[0] if inputs[0].shape else None
        self.fixed_batch = batch if isinstance(batch, int) else None
        self.xnnpack = None
        self.xnnpack_applied = None
        self.threads = threads

    def predict(self, x):
        return self.session.run([self._out_name], {self._in_name: x})[0]


def _qdq_grids(path: str, names) -> dict:
    """``{tensor: (scale, zero_point)}`` of integer graph inputs/outputs, read from the
    DequantizeLinear that consumes an input or the QuantizeLinear that writes an output (ONNX
    Runtime does not expose them). Needs the ``onnx`` package; without it, or without such a node
    beside a tensor, the tensor has no grid and only integer data can be fed or read."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return {}
    graph = onnx.load(path).graph
    inits = {t.name: t for t in graph.initializer}
    grids = {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input and node.input[0] in names:
            name = node.input[0]
        elif node.op_type == "QuantizeLinear" and node.output and node.output[0] in names:
            name = node.output[0]
        else:
            continue
        if node.input[1] not in inits or (len(node.input) > 2 and node.input[2] not in inits):
            continue
        scale = numpy_helper.to_array(inits[node.input[1]])
        zp = numpy_helper.to_array(inits[node.input[2]]) if len(node.input) > 2 else np.zeros(())
        if scale.size == 1 and zp.size == 1:  # per-tensor grids only: one scale per sample value
            grids.setdefault(name, (float(scale.reshape(())), int(zp.reshape(()))))
    return grids


BACKENDS = {".tflite": TFLiteBackend, ".onnx": OnnxBackend}


def open_backend(path: str, threads: int = 1, xnnpack: bool = True, runtime: str | None = None,
                 backends=None, reference_kernels: bool = False):
    """The backend for ``path`` by its suffix; ``reference_kernels`` is for ``.tflite`` only."""
    backends = backends or BACKENDS
    if not os.path.exists(path):
        raise RunnerError("artifact", f"{path!r} does not exist; check the path")
    # "/" stands for a directory (a SavedModel, measured by the Keras harness)
    ext = "/" if os.path.isdir(path) else os.path.splitext(path)[1].lower()
    if ext not in backends:
        kinds = ", ".join("a directory" if k == "/" else k for k in sorted(backends))
        given = {"/": "a directory", "": "a file without suffix"}.get(ext, f"a {ext} file")
        raise RunnerError("artifact", f"{path!r} is {given}; this runner measures {kinds}")
    if runtime in MICRO_RUNTIMES:
        if ext != ".tflite":
            raise RunnerError("usage", f"--runtime {runtime} runs .tflite files; {path!r} is not one")
        return MicroBackend(path, threads)
    if reference_kernels:
        if backends[ext] is not TFLiteBackend:
            raise RunnerError("usage", f"reference kernels are TFLite's; {path!r} is not a .tflite "
                                       "file, so run it without them")
        return TFLiteBackend(path, threads, xnnpack, runtime, reference_kernels=True)
    return backends[ext](path, threads, xnnpack, runtime)


# --------------------------------------------------------------------------------------------
# Inputs


def _shape_matches(sample_shape, model_shape) -> bool:
    model_sample = model_shape[1:]
    return len(sample_shape) == len(model_sample) and all(
        m is None or m < 0 or m == s for s, m in zip(sample_shape, model_sample))


def prepare_inputs(x, spec: dict, x_quantization=None):
    """``x`` (N, ...) converted to the model input's dtype, quantizing float data with the
    model's input (scale, zero_point) and dequantizing int data with ``x_quantization``."""
    x = np.asarray(x)
    if x.ndim == len(spec["shape"]) - 1:  # one sample without its batch axis
        x = x[None]
    if not _shape_matches(tuple(x.shape[1:]), spec["shape"]):
        raise RunnerError("inputs", f"input samples have shape {tuple(x.shape[1:])} but the model "
                                    f"input {spec['name']!r} takes {spec['shape'][1:]}; pass data "
                                    "of the model's sample shape")
    want = np.dtype(spec["dtype"])
    same_grid = x_quantization is None or spec["quantization"] is None or (
        np.isclose(float(x_quantization[0]), spec["quantization"][0], rtol=1e-6)
        and int(x_quantization[1]) == spec["quantization"][1])
    if x.dtype == want and same_grid:
        return np.ascontiguousarray(x)
    if want.kind == "f":
        if x.dtype.kind in "iu":
            if x_quantization is None:
                raise RunnerError("inputs", f"inputs are {x.dtype.name} but the model takes "
                                            f"{want.name}; ship x_quantization=[scale, zero_point]"
                                            " in the .npz or float inputs")
            scale, zp = float(x_quantization[0]), int(x_quantization[1])
            return ((x.astype(np.float32) - zp) * scale).astype(want)
        return x.astype(want)
    if want.kind in "iu":
        if spec["quantization"] is None:
            raise RunnerError("inputs", f"the model input is {want.name} without a quantization "
                                        f"scale, and inputs are {x.dtype.name}; pass {want.name} "
                                        "inputs")
        if x.dtype.kind in "iu":
            if x_quantization is None:
                raise RunnerError("inputs", f"inputs are {x.dtype.name} but the model takes "
                                            f"{want.name}; pass {want.name} or float inputs")
            scale, zp = float(x_quantization[0]), int(x_quantization[1])
            x = (x.astype(np.float32) - zp) * scale
        scale, zp = spec["quantization"]
        info = np.iinfo(want)
        # float32 arithmetic, as TFLite's QUANTIZE kernel rounds x / scale
        q = np.round(x.astype(np.float32) / np.float32(scale)) + zp
        return np.clip(q, info.min, info.max).astype(want)
    raise RunnerError("inputs", f"the model input dtype {want.name} is not supported; the runner "
                                "feeds float, int8 and uint8 inputs")


def load_inputs(path: str | None, spec: dict, samples: int = RANDOM_SAMPLES, seed: int = 0):
    """``(x, y, description)``: the .npz arrays, or seeded random inputs when ``path`` is None."""
    if path is None:
        rng = np.random.default_rng(seed)
        shape = [samples] + [d if d and d > 0 else 1 for d in spec["shape"][1:]]
        want = np.dtype(spec["dtype"])
        if want.kind in "iu":
            info = np.iinfo(want)
            x = rng.integers(info.min, info.max + 1, size=shape).astype(want)
        else:
            x = rng.standard_normal(shape).astype(want)
        return x, None, {"source": "random", "seed": seed, "samples": samples}
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise RunnerError("inputs", f"cannot read inputs {path!r}: {e}; pass an .npz with x "
                                    "[and y]") from None
    if "x" not in arrays:
        raise RunnerError("inputs", f"inputs {path!r} hold {sorted(arrays)} but no 'x'; save the "
                                    "samples as x (and labels as y)")
    xq = arrays.get("x_quantization")
    x = prepare_inputs(arrays["x"], spec, None if xq is None else xq.tolist())
    if len(x) == 0:
        raise RunnerError("inputs", f"inputs {path!r} hold 0 samples; pass at least one")
    y = arrays.get("y")
    if y is not None:
        y = np.asarray(y).reshape(-1)
        if y.dtype.kind not in "iu" or len(y) != len(x):
            raise RunnerError("inputs", f"labels y are {y.dtype.name} of length {len(y)} for "
                                        f"{len(x)} samples; pass one integer class per sample")
    return x, y, {"source": "npz", "samples": int(len(x)), "labels": y is not None}


# --------------------------------------------------------------------------------------------
# Measurement


def peak_rss() -> tuple:
    """``(MiB, source)``: the process's peak resident set size.

    Linux's ``VmHWM`` first: ``getrusage``'s ``ru_maxrss`` survives ``exec`` and so reports the
    parent's size for a child forked from a large process (the toolchain's own Python).
    ``getrusage`` where /proc is absent (macOS, a chroot; under QEMU it includes the emulator).
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 2), "VmHWM"
    except (OSError, ValueError, IndexError):
        pass
    if resource is None:
        return None, None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux, bytes on macOS
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 2), "getrusage"


def peak_rss_mib() -> float | None:
    return peak_rss()[0]


def machine_info() -> dict:
    cpu = None
    try:
        with open("/proc/cpuinfo") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        cpu = fields.get("model name") or fields.get("Model") or fields.get("CPU part")
    except OSError:
        pass
    return {"machine": platform.machine(), "processor": platform.processor(),
            "system": platform.system(), "release": platform.release(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "cpu": cpu}


def dequantize(out, spec: dict):
    """Float32 outputs: integer outputs mapped through the output's (scale, zero_point)."""
    if np.dtype(spec["dtype"]).kind in "iu":
        if spec["quantization"] is None:
            raise RunnerError("artifact", f"the model output {spec['name']!r} is "
                                          f"{spec['dtype']} without a quantization scale, so its "
                                          "values cannot be read as floats; export with float "
                                          "outputs or a scale")
        scale, zp = spec["quantization"]
        return ((out.astype(np.float32) - zp) * np.float32(scale)).astype(np.float32)
    return out.astype(np.float32)


def infer(backend, x, batch_size: int = INFER_BATCH, x_quantization=None):
    """Float32 outputs of ``backend`` on every sample of ``x`` (N, ...), ``batch_size`` samples
    per invoke (the model's fixed batch size when it has one): float inputs are quantized with
    the model's input grid (:func:`prepare_inputs`), integer outputs dequantized with the output's."""
    x = prepare_inputs(x, backend.input, x_quantization)
    step = backend.fixed_batch or batch_size
    outs = [np.asarray(backend.predict(x[i:i + step])) for i in range(0, len(x), step)]
    if not outs:
        shape = [0] + [d if d and d > 0 else 1 for d in backend.output["shape"][1:]]
        return np.zeros(shape, np.float32)
    return dequantize(np.concatenate(outs), backend.output)


def _dequantize(out, spec):
    """Like :func:`dequantize`, but integer outputs without a grid are scored as their values."""
    if spec["quantization"] is None:
        return out.astype(np.float32)
    return dequantize(out, spec)


def measure(backend, x, y=None, runs: int = DEFAULT_RUNS, warmup: int = DEFAULT_WARMUP,
            include_outputs: bool = False) -> dict:
    """Time ``runs`` single-sample inferences after ``warmup``; then predict every sample once."""
    samples = [np.ascontiguousarray(x[i:i + 1]) for i in range(len(x))]
    n = len(samples)
    for i in range(warmup):
        backend.predict(samples[i % n])
    times = np.empty(runs, dtype=np.float64)
    clock = time.perf_counter_ns
    for i in range(runs):
        s = samples[i % n]
        t0 = clock()
        backend.predict(s)
        times[i] = clock() - t0
    times_ms = times / 1e6
    outputs = np.concatenate([np.asarray(backend.predict(s)) for s in samples])
    pcts = np.percentile(times_ms, PERCENTILES)
    result = {
        "runs": runs,
        "warmup": warmup,
        "latency_ms": dict({f"p{p}": round(float(v), 4) for p, v in zip(PERCENTILES, pcts)},
                           mean=round(float(times_ms.mean()), 4),
                           min=round(float(times_ms.min()), 4),
                           max=round(float(times_ms.max()), 4)),
        "throughput_per_s": round(1e3 / float(times_ms.mean()), 2),
        "outputs_sha256": hashlib.sha256(np.ascontiguousarray(outputs).tobytes()).hexdigest(),
    }
    scores = _dequantize(outputs, backend.output).reshape(len(samples), -1)
    predictions = scores.argmax(axis=1)
    result["accuracy"] = None if y is None else round(float(np.mean(predictions == y)), 6)
    result["accuracy_samples"] = None if y is None else int(len(y))
    if include_outputs:
        result["outputs"] = scores.tolist()
    return result


def run(artifact: str, inputs: str | None = None, runs: int = DEFAULT_RUNS,
        warmup: int = DEFAULT_WARMUP, threads: int = 1, xnnpack: bool = True,
        runtime: str | None = None, include_outputs: bool = False, backends=None,
        samples: int = RANDOM_SAMPLES) -> dict:
    """Measure ``artifact`` and return the JSON-ready result (see the module docstring)."""
    if np is None:
        raise RunnerError("missing_runtime", f"numpy is not installed on this machine; install it "
                                             f"with `python3 -m pip install '{PIP_NUMPY}'`",
                          install=f"python3 -m pip install '{PIP_NUMPY}'")
    rss_start = peak_rss_mib()
    backend = open_backend(artifact, threads, xnnpack, runtime, backends)
    x, y, source = load_inputs(inputs, backend.input, samples)
    rss_loaded = peak_rss_mib()
    stats = measure(backend, x, y, runs, warmup, include_outputs)
    return {
        "schema": SCHEMA,
        "artifact": os.path.basename(artifact.rstrip("/")),
        "artifact_bytes": _size(artifact),
        "format": backend.format,
        "runtime": backend.runtime,
        "threads": threads,
        "xnnpack": backend.xnnpack,
        "xnnpack_applied": backend.xnnpack_applied,
        "input": backend.input,
        "output": backend.output,
        "inputs": source,
        "import_ms": round(backend.import_ms, 3),
        "load_ms": round(backend.load_ms, 3),
        **stats,
        "peak_rss_mib": peak_rss_mib(),
        "peak_rss_source": peak_rss()[1],
        "peak_rss_before_load_mib": rss_start,
        "peak_rss_after_load_mib": rss_loaded,
        "machine": machine_info(),
    }


def describe(artifact: str, runtime: str | None = None, backends=None) -> dict:
    """The artifact's input/output specs and the runtime that opened it (no timing)."""
    if np is None:
        raise RunnerError("missing_runtime", "numpy is not installed on this machine",
                          install=f"python3 -m pip install '{PIP_NUMPY}'")
    backend = open_backend(artifact, 1, True, runtime, backends)
    return {"schema": SCHEMA, "artifact": os.path.basename(artifact.rstrip("/")),
            "format": backend.format, "runtime": backend.runtime, "input": backend.input,
            "output": backend.output}


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


# --------------------------------------------------------------------------------------------
# Command line


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or more")
    return value


def build_parser(prog: str = "runner.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--artifact", required=True, help="the .tflite or .onnx file to measure")
    p.add_argument("--inputs", help=".npz with x [, y, x_quantization]; default: random inputs")
    p.add_argument("--runs", type=_positive, default=DEFAULT_RUNS, help="timed inferences")
    p.add_argument("--warmup", type=_non_negative, default=DEFAULT_WARMUP,
                   help="untimed inferences first")
    p.add_argument("--threads", type=_positive, default=1, help="runtime threads")
    p.add_argument("--xnnpack", choices=("on", "off"), default="on",
                   help="TFLite: apply the default XNNPACK delegate (on) or builtin kernels only")
    p.add_argument("--runtime", help="force one runtime: " + ", ".join(
        TFLITE_RUNTIMES + MICRO_RUNTIMES + ONNX_RUNTIMES))
    p.add_argument("--samples", type=_positive, default=RANDOM_SAMPLES,
                   help="random samples when no --inputs are given")
    p.add_argument("--include-outputs", action="store_true",
                   help="add every sample's (dequantized) output to the JSON")
    p.add_argument("--describe", action="store_true",
                   help="print the artifact's input/output and runtime only")
    return p


def main(argv=None, backends=None, prog: str = "runner.py") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        if args.describe:
            result = describe(args.artifact, args.runtime, backends)
        else:
            result = run(args.artifact, args.inputs, args.runs, args.warmup, args.threads,
                         args.xnnpack == "on", args.runtime, args.include_outputs, backends,
                         args.samples)
    except RunnerError as e:
        sys.stdout.write("\n" + json.dumps(e.as_json()) + "\n")
        sys.stdout.flush()
        return EXIT_MISSING_RUNTIME if e.kind == "missing_runtime" else EXIT_ERROR
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
