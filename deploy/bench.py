"""``bench``: measure one artifact on one target, in every requested configuration.

    result = bench("model_int8.tflite", target="local", data="kws01", threads=(1, 2),
                   xnnpack=(True, False), out="results/bench")
    result.measurements[0].p50_ms

The inputs are the data spec's evaluation split (``--samples`` caps it), converted on this machine
to what the artifact takes: int8 artifacts get int8 samples (the dataset's own int8 samples when
it ships them with the artifact's quantization, as kws01 does for the MLPerf Tiny reference),
quantized with the artifact's input scale and zero point otherwise. The same ``inputs.npz`` goes
to every configuration and target, so Keras, TFLite and ONNX Runtime rows are comparable.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from deploy import runner as _runner
from deploy.targets import RunConfig, RunRequest, Target, resolve_target
from deploy.targets.base import DEFAULT_RUN_TIMEOUT_S, parse_runner_output
from toolchain.errors import ConfigError, ModelLoadError

SCHEMA = "toolchain.bench.v1"
ARTIFACT_KINDS = {".tflite": "tflite", ".onnx": "onnx", ".keras": "keras", ".h5": "keras",
                  ".hdf5": "keras"}
DESCRIBE_TIMEOUT_S = 300


@dataclass(frozen=True)
class Measurement:
    """One configuration's numbers; ``raw`` is the runner's full JSON."""

    config: RunConfig
    runtime: str
    runtime_version: str
    p50_ms: float
    p90_ms: float
    p99_ms: float
    throughput_per_s: float
    load_ms: float
    peak_rss_mib: Optional[float]
    accuracy: Optional[float]
    emulated: bool
    raw: Mapping[str, object] = field(repr=False, compare=False)

    @classmethod
    def from_runner(cls, doc: dict, config: RunConfig) -> "Measurement":
        lat = doc["latency_ms"]
        rt = doc["runtime"]
        name = rt["name"] + (" (fallback)" if rt.get("fallback") else "")
        return cls(config, name, str(rt["version"]), lat["p50"], lat["p90"], lat["p99"],
                   doc["throughput_per_s"], doc["load_ms"], doc.get("peak_rss_mib"),
                   doc.get("accuracy"), bool(doc.get("emulated")), MappingProxyType(dict(doc)))


@dataclass(frozen=True)
class BenchResult:
    artifact: str
    artifact_bytes: int
    artifact_sha256: str
    format: str
    target: Mapping[str, object]
    emulated: bool
    data: Mapping[str, object]
    runs: int
    warmup: int
    measurements: Tuple[Measurement, ...]

    @classmethod
    def from_json(cls, doc: Mapping[str, object]) -> "BenchResult":
        """The result ``to_json`` (``bench.json``) describes."""
        if doc.get("schema") != SCHEMA:
            raise ConfigError(f"this is not a {SCHEMA} document (schema {doc.get('schema')!r}); "
                              "pass a bench.json written by `toolchain bench`")
        art = doc["artifact"]
        ms = tuple(Measurement.from_runner(c, RunConfig(c["threads"], c["xnnpack"]))
                   for c in doc["configurations"])
        return cls(art["name"], art["bytes"], art["sha256"], art["format"], doc["target"],
                   doc["emulated"], doc["data"], doc["runs"], doc["warmup"], ms)

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA,
            "artifact": {"name": self.artifact, "bytes": self.artifact_bytes,
                         "sha256": self.artifact_sha256, "format": self.format},
            "target": dict(self.target), "emulated": self.emulated, "data": dict(self.data),
            "runs": self.runs, "warmup": self.warmup,
            "configurations": [dict(m.raw) for m in self.measurements],
        }

    def _machine_line(self, machine: Mapping[str, object]) -> str:
        if self.emulated:
            host = self.measurements[0].raw.get("emulation", {}).get("host_machine")
            return (f"- machine: QEMU-emulated {machine.get('machine')} "
                    f"({self.target.get('qemu_cpu')}, /proc/cpuinfo of a "
                    f"{self.target.get('board')}) on a {host} host, Python "
                    f"{machine.get('python')}")
        return (f"- machine: {machine.get('machine')} {machine.get('cpu') or ''}, "
                f"{machine.get('cpu_count')} CPUs, Python {machine.get('python')}")

    def _firmware_markdown(self) -> list:
        """A microcontroller firmware run: EMULATED INSTRUCTION COUNTS, flash and RAM, not ms."""
        t, data = self.target, self.data
        what = ("seeded random inputs (no accuracy)" if data.get("spec") is None else
                f"`{data['spec']}` {data['split']} split, {data['samples']} samples")
        lines = [f"> **Emulated microcontroller, not device timings.** {t.get('note', '')} The counts below are "
                 f"{t.get('measures', 'EMULATED INSTRUCTION COUNTS')} (board {t.get('board')}, "
                 f"{t.get('kernels')} kernels).", "",
                 f"- artifact: {self.format}, {self.artifact_bytes:,} bytes, sha256 `{self.artifact_sha256[:16]}…`",
                 f"- inputs: {what}; every sample run once (the count of an input is deterministic)", "",
                 "| configuration | runtime | EMULATED instructions / inference (median) | min | max | "
                 "flash (B) | RAM (B) | arena used (B) | stack (B) | accuracy |",
                 "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for m in self.measurements:
            fw = m.raw["firmware"]
            acc = "–" if m.accuracy is None else f"{100 * m.accuracy:.2f}%"
            lines.append(f"| {m.config.label()} | {m.runtime} {m.runtime_version} | "
                         f"{fw['emulated_instructions_per_inference']:,} | {fw['emulated_instructions_min']:,} | "
                         f"{fw['emulated_instructions_max']:,} | {fw['flash_bytes']:,} | {fw['ram_bytes']:,} | "
                         f"{fw['ram']['arena_used']:,} | {fw['ram']['stack_used']:,} | {acc} |")
        return lines

    def to_markdown(self) -> str:
        t = self.target
        lines = [f"# Benchmark: `{self.artifact}` on `{t['spec']}`", ""]
        if self.measurements and all(m.raw.get("firmware") for m in self.measurements):
            return "\n".join(lines + self._firmware_markdown()) + "\n"
        if self.emulated:
            lines += [f"> **Emulated, not Raspberry Pi timings.** {t.get('note', '')} "
                      f"(board {t.get('board')}, QEMU CPU {t.get('qemu_cpu')}).", ""]
        data = self.data
        what = ("seeded random inputs (no accuracy)" if data.get("spec") is None else
                f"`{data['spec']}` {data['split']} split, {data['samples']} samples")
        machine = self.measurements[0].raw.get("machine", {}) if self.measurements else {}
        lines += [f"- artifact: {self.format}, {self.artifact_bytes:,} bytes, sha256 "
                  f"`{self.artifact_sha256[:16]}…`",
                  f"- inputs: {what}; {self.runs} timed single-sample runs after {self.warmup} "
                  "warm-up runs per configuration",
                  self._machine_line(machine), ""]
        prefix = "QEMU " if self.emulated else ""
        lines += [f"| configuration | runtime | {prefix}p50 ms | {prefix}p90 ms | {prefix}p99 ms "
                  f"| {prefix}inferences/s | load ms | peak RSS MiB | accuracy |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for m in self.measurements:
            acc = "–" if m.accuracy is None else f"{100 * m.accuracy:.2f}%"
            rss = "–" if m.peak_rss_mib is None else f"{m.peak_rss_mib:.1f}"
            lines.append(f"| {m.config.label()} | {m.runtime} {m.runtime_version} | "
                         f"{m.p50_ms:.4g} | {m.p90_ms:.4g} | {m.p99_ms:.4g} | "
                         f"{m.throughput_per_s:,.0f} | {m.load_ms:.1f} | {rss} | {acc} |")
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------


def artifact_kind(path: Path) -> str:
    if not path.exists():
        raise ModelLoadError(f"artifact {str(path)!r} does not exist; check the path")
    if path.is_dir():
        return "keras"
    kind = ARTIFACT_KINDS.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"artifact {path.name!r} is not something bench measures; give a "
                          ".tflite, .onnx, .keras or .h5 file or a SavedModel directory")
    return kind


def configurations(kind: str, threads: Sequence[int] = (1,),
                   xnnpack: Optional[Sequence[bool]] = None) -> Tuple[RunConfig, ...]:
    """Every (threads, XNNPACK) pair; XNNPACK exists for TFLite only (default: on)."""
    bad = [t for t in threads if isinstance(t, bool) or not isinstance(t, int) or t <= 0]
    if not threads or bad:
        raise ConfigError(f"threads {list(threads)!r} are not allowed; give positive integers, "
                          "e.g. --threads 1,2")
    if kind != "tflite":
        if xnnpack is not None:
            raise ConfigError(f"--xnnpack applies to .tflite artifacts, not {kind}; leave it out")
        return tuple(RunConfig(t, None) for t in dict.fromkeys(threads))
    xnn = (True,) if xnnpack is None else tuple(dict.fromkeys(bool(x) for x in xnnpack))
    if not xnn:
        raise ConfigError("--xnnpack needs at least one of on, off")
    return tuple(RunConfig(t, x) for x, t in product(xnn, dict.fromkeys(threads)))


def describe_artifact(path: Path, kind: str, trust_model: bool = False) -> dict:
    """Input/output specs of the artifact, read by the runner in a child process on this
    machine (TensorFlow, if it is the fallback runtime, stays out of this process)."""
    entry = ([sys.executable, "-m", "deploy.keras_runner"] if kind == "keras"
             else [sys.executable, _runner.__file__])
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
               TOOLCHAIN_TRUST_MODEL="1" if trust_model else "0")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                  else []))
    try:
        done = subprocess.run(entry + ["--describe", "--artifact", str(path)], env=env,
                              capture_output=True, text=True, timeout=DESCRIBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise ModelLoadError(f"reading {path.name} took over {DESCRIBE_TIMEOUT_S} s; check the "
                             "file") from None
    return parse_runner_output(f"reading {path.name} on this machine", done.returncode,
                               done.stdout, done.stderr)


def prepare_inputs(dataset, spec: dict, samples: Optional[int] = None):
    """``(x, y, x_quantization, split)`` for the artifact input ``spec`` from ``dataset``."""
    from toolchain.data import check_compatible, fit_to_model

    # the artifact's own input shape decides a unit channel axis or flattening, as load_inputs does
    dataset = fit_to_model(dataset, tuple(spec["input"]["shape"])[1:])
    check_compatible(dataset, spec["input"]["shape"], spec["output"]["shape"][-1])
    if dataset.x_eval is not None:
        split, x, y, x8 = "eval", dataset.x_eval, dataset.y_eval, dataset.x_eval_int8
    else:
        split, x, y, x8 = "train", dataset.x_train, dataset.y_train, dataset.x_train_int8
    if samples is not None:
        if samples > len(x):
            raise ConfigError(f"--samples {samples} exceeds the {len(x)} samples of "
                              f"{dataset.name}'s {split} split; pass at most {len(x)}")
        x, y, x8 = x[:samples], y[:samples], None if x8 is None else x8[:samples]
    if not dataset.is_classification:
        y = None  # the runner's accuracy is top-1 over class labels; float targets have none
    want = spec["input"]
    q = want.get("quantization")
    if want["dtype"] == "int8" and q is not None and x8 is not None and \
            dataset.input_quantization is not None and \
            math.isclose(dataset.input_quantization[0], q[0], rel_tol=1e-6) and \
            dataset.input_quantization[1] == q[1]:
        return np.ascontiguousarray(x8), y, np.array(q, dtype=np.float64), split
    try:
        ready = _runner.prepare_inputs(x, want)
    except _runner.RunnerError as e:
        raise ConfigError(f"inputs for this artifact: {e}") from None
    xq = np.array(q, dtype=np.float64) if ready.dtype.kind in "iu" and q else None
    return ready, y, xq, split


def _sha256(path: Path) -> str:
    from toolchain.model_io import file_sha256

    return file_sha256(path)


def bench(artifact: Union[str, os.PathLike], target: Union[str, Target] = "local",
          data: Optional[str] = None, data_dir: Optional[str] = None,
          samples: Optional[int] = None, runs: int = _runner.DEFAULT_RUNS,
          warmup: int = _runner.DEFAULT_WARMUP, threads: Sequence[int] = (1,),
          xnnpack: Optional[Sequence[bool]] = None, out: Union[str, os.PathLike, None] = None,
          timeout_s: float = DEFAULT_RUN_TIMEOUT_S, include_outputs: bool = False,
          trust_model: bool = False, quiet: bool = False, **target_options) -> BenchResult:
    """Measure ``artifact`` on ``target`` once per configuration; write ``out`` if given.

    ``target`` is a ``Target`` or a CLI string (``local``, ``ssh://[user@]host[:port]``,
    ``emulated-pi4``, ``emulated-pi5``; ``target_options`` go to its constructor). ``out``
    receives ``bench.json``, ``bench.md``, ``bench.png`` and the ``inputs.npz`` that was measured.
    """
    from toolchain.outdir import check_output_dir, staged_output

    path = Path(artifact).expanduser()
    kind = artifact_kind(path)
    configs = configurations(kind, tuple(threads), xnnpack)
    for name, value, lowest in (("runs", runs, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise ConfigError(f"{name} {value!r} is not allowed; pass an integer >= {lowest}")
    tgt = target if isinstance(target, Target) else resolve_target(
        target, quiet=quiet, trust_model=trust_model, **target_options)
    if kind == "keras" and tgt.key != "target.local":
        raise ConfigError(f"{path.name} is a Keras model, which runs on the local target only; "
                          f"export it to .tflite or .onnx to measure it on {tgt.spec}")
    if out is not None:
        check_output_dir(out)
    tgt.check()
    spec = describe_artifact(path, kind, trust_model)
    ds = None
    if data is not None:
        from toolchain.data import load_dataset

        # loaders that resize (images:) need the artifact's own sample shape, as compress passes the model's
        sample = tuple(spec["input"]["shape"])[1:]
        ds = load_dataset(data, data_dir=data_dir,
                          input_shape=sample if sample and all(isinstance(d, int) and d > 0 for d in sample) else None)

    def measure(workdir: Path) -> BenchResult:
        inputs, data_info = None, {"spec": None, "split": None, "samples": None}
        if ds is not None:
            x, y, xq, split = prepare_inputs(ds, spec, samples)
            inputs = workdir / "inputs.npz"
            arrays = {"x": x} if y is None else {"x": x, "y": y}
            if xq is not None:
                arrays["x_quantization"] = xq
            np.savez(inputs, **arrays)
            data_info = {"spec": data, "name": ds.name, "split": split, "samples": int(len(x)),
                         "dtype": x.dtype.name, "inputs_sha256": _sha256(inputs),
                         "provenance": ds.provenance}
        request = RunRequest(path, inputs, runs, warmup, include_outputs, float(timeout_s))
        from tqdm import tqdm

        with tqdm(total=len(configs), desc=f"bench {path.name} on {tgt.spec}", unit="config",
                  disable=quiet, file=sys.stderr) as bar:
            docs = tgt.run(request, configs, on_result=lambda _: bar.update(1))
        return BenchResult(
            path.name, _runner._size(str(path)), _sha256(path), kind, tgt.info(), tgt.emulated,
            data_info, runs, warmup,
            tuple(Measurement.from_runner(d, c) for d, c in zip(docs, configs)))

    if out is None:
        with tempfile.TemporaryDirectory(prefix="toolchain-bench-") as tmp:
            return measure(Path(tmp))
    with staged_output(out) as stage:
        result = measure(stage)
        write_outputs(result, stage)
    return result


def write_outputs(result: BenchResult, out_dir: Path) -> None:
    doc = dict(result.to_json(), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    (out_dir / "bench.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out_dir / "bench.md").write_text(result.to_markdown())
    plot(result, out_dir / "bench.png")


def plot(result: BenchResult, path: Path) -> None:
    """p50 bars with a p99 whisker per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = result.measurements
    firmware = bool(ms) and all(m.raw.get("firmware") for m in ms)
    labels = [f"{m.config.label()}\n{m.runtime}" for m in ms]
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(ms) + 1.6))
    pos = np.arange(len(ms))
    if firmware:  # an instruction count, not a time: median bar, max whisker
        p50 = np.array([m.raw["firmware"]["emulated_instructions_per_inference"] for m in ms], dtype=float)
        p99 = np.array([m.raw["firmware"]["emulated_instructions_max"] for m in ms], dtype=float)
    else:
        p50 = np.array([m.p50_ms for m in ms])
        p99 = np.array([m.p99_ms for m in ms])
    ax.barh(pos, p50, color="#4c72b0", label="median" if firmware else "p50")
    ax.errorbar(p99, pos, fmt="|", color="black", markersize=14, label="max" if firmware else "p99")
    ax.set_yticks(pos, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("EMULATED INSTRUCTION COUNT per inference (QEMU -icount; not cycles, not time)" if firmware
                  else "QEMU-emulated latency (ms, not Pi timings)" if result.emulated
                  else "latency per single-sample inference (ms)")
    ax.set_title(f"{result.artifact} on {result.target['spec']}", fontsize=10)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
