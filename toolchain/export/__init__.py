"""Export stage: TFLite and ONNX artifacts from a (compressed) Keras model, each verified in its own
runtime, plus a microcontroller bundle.

    bundle = export(model, dataset, ["tflite-int8", "tflite-mixed", "onnx-fp32", "mcu"], "out/",
                    bitplan=plan)
    bundle.artifacts["tflite-int8"].path, bundle.verify.table(), bundle.mcu.arena_bytes

``export`` converts every requested format into a staging directory, runs every artifact on the
evaluation split (:func:`toolchain.verify.verify`; the MCU bundle's model also in tflite-micro
itself, :mod:`toolchain.export.micro`), and only then renames the staging directory
to ``out_dir`` (``toolchain.outdir.staged_output``). A conversion or verification failure raises
and leaves ``out_dir`` as it was: a failing artifact is never written as a final output.

Output layout::

    out_dir/<name>_<variant>.tflite, <name>_<variant>.onnx   the artifacts
    out_dir/verify.json                                      VerifyReport
    out_dir/export.json                                      every Artifact (metadata read back)
    out_dir/mcu/model_data.{h,cc}, op_resolver.h, manifest.json   (format "mcu")

Formats live in :data:`FORMATS`, a registry with dotted keys (``tflite.int8``); users name them
with a dash (``tflite-int8``), as the CLI does.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

from toolchain.errors import ConfigError
from toolchain.export.artifact import Artifact, write_bytes_atomic
from toolchain.registry import Registry

DEFAULT_CALIBRATION_SAMPLES = 500
DEFAULT_ONNX_OPSET = 13
MCU = "mcu"
#: integer TFLite formats the MCU bundle can be made from (tflite-sparse needs DENSIFY, which
#: tflite-micro lacks; tflite-mixed must have no float layers, checked before converting and when
#: the bundle is made; its packed INT4 kernels reach the bundle and the firmware as they are)
MCU_SOURCES = ("tflite-int8", "tflite-mixed")


@dataclass(frozen=True)
class FormatSpec:
    """One export format: its user-facing name, runtime, file suffix and what it needs."""

    name: str                 # "tflite-int8"
    runtime: str              # "tflite" | "onnx" | "mcu"
    suffix: str               # ".tflite" | ".onnx" | ""
    description: str
    needs_bitplan: bool = False
    calibrated: bool = False


FORMATS: Registry = Registry("export format")
for _spec in (
    FormatSpec("tflite-fp32", "tflite", ".tflite", "TFLite float32"),
    FormatSpec("tflite-fp16", "tflite", ".tflite", "TFLite float16 weights"),
    FormatSpec("tflite-dynamic", "tflite", ".tflite", "TFLite dynamic-range (int8 weights, float activations)"),
    FormatSpec("tflite-int8", "tflite", ".tflite", "TFLite full integer int8 (int8 I/O by default)", calibrated=True),
    FormatSpec("tflite-int16x8", "tflite", ".tflite", "TFLite int16 activations, int8 weights", calibrated=True),
    FormatSpec("tflite-sparse", "tflite", ".tflite", "TFLite int8 with sparse kernels (pruned models)", calibrated=True),
    FormatSpec("tflite-mixed", "tflite", ".tflite", "TFLite per-layer widths from a BitPlan (INT4/INT8/float)",
               needs_bitplan=True, calibrated=True),
    FormatSpec("onnx-fp32", "onnx", ".onnx", "ONNX float32 (tf2onnx)"),
    FormatSpec("onnx-int8", "onnx", ".onnx", "ONNX static int8 QDQ, per-channel", calibrated=True),
    FormatSpec("onnx-mixed", "onnx", ".onnx", "ONNX QDQ with BitPlan overrides (int4/int8/uint16)",
               needs_bitplan=True, calibrated=True),
    FormatSpec(MCU, "mcu", "", "tflite-micro bundle (model_data.cc/.h, op_resolver.h, manifest.json) "
                               "from tflite-int8, or tflite-mixed with its INT4 kernels kept packed"),
):
    FORMATS.register(_spec.name.replace("-", "."), _spec)


def format_names() -> List[str]:
    return [FORMATS.get(k).name for k in FORMATS]


def parse_formats(formats: Union[str, Iterable[str]]) -> List[str]:
    """Validated format names in request order; all unknown names are reported at once."""
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    names = [f.strip() for f in items if f and f.strip()]
    known = format_names()
    if not names:
        raise ConfigError(f"no export format given; choose from: {', '.join(known)}")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown export format(s) {', '.join(repr(u) for u in unknown)}; "
                          f"known formats: {', '.join(known)}")
    out: List[str] = []
    for n in names:
        if n not in out:
            out.append(n)
    return out


@dataclass(frozen=True)
class ExportBundle:
    """What ``export`` wrote: the artifacts (paths in ``out_dir``), their verification and the
    MCU bundle."""

    out_dir: Path
    artifacts: Mapping[str, Artifact]
    verify: "object"            # toolchain.verify.VerifyReport
    mcu: Optional["object"] = None  # toolchain.export.mcu.McuBundle
    requested: tuple = ()

    def to_dict(self) -> dict:
        d = {"out_dir": str(self.out_dir), "requested": list(self.requested),
             "artifacts": {k: _relative(a.to_dict(), self.out_dir) for k, a in self.artifacts.items()},
             "verify": self.verify.to_dict() if self.verify is not None else None}
        if self.mcu is not None:
            d["mcu"] = dict(self.mcu.manifest)
        return d

    def table(self) -> str:
        rows = [f"{'format':16s} {'bytes':>9s} {'accuracy':>9s} {'agree':>7s}  file"]
        for fmt, a in self.artifacts.items():
            c = self.verify[fmt]
            rows.append(f"{fmt:16s} {a.size_bytes:9d} {c.accuracy:9.4f} {c.agreement:7.4f}  {Path(a.path).name}")
        if self.mcu is not None:
            m = self.mcu.micro
            acc = f"{m.micro_accuracy:9.4f}" if m is not None and m.micro_accuracy is not None else f"{'':>9s}"
            measured = (f"; in tflite-micro: top-1 = TFLite on {m.top1_agreement:.1%} of {m.samples}, "
                        f"smallest arena {m.arena_min_bytes} B on this 64-bit host") if m is not None else ""
            rows.append(f"{'mcu':16s} {self.mcu.flash_bytes:9d} {acc} {'':>7s}  mcu/ "
                        f"(arena {self.mcu.arena_bytes} B, {len(self.mcu.ops)} ops{measured})")
        return "\n".join(rows)


def _relative(d: dict, root: Path) -> dict:
    d = dict(d)
    try:
        d["path"] = str(Path(d["path"]).relative_to(root))
    except ValueError:
        pass
    return d


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def artifact_name(model) -> str:
    name = re.sub(r"[^0-9a-zA-Z_]+", "_", getattr(model, "name", "model") or "model").strip("_").lower()
    return name or "model"


def _check_plan_for_mcu(bitplan) -> None:
    """tflite-mixed keeps a plan's float layers (32-bit activations, > 8-bit weights) in float, which
    tflite-micro cannot run: refuse before converting, naming them."""
    from toolchain.errors import ConversionError

    floats = [name for name, lb in bitplan.layers.items() if lb.activation_bits == 32 or lb.weight_bits > 8]
    if floats:
        raise ConversionError(
            f"the bit plan keeps layers {', '.join(floats)} in float (32-bit activations or > 8-bit weights), "
            "and the MCU bundle runs integer kernels only; give them <= 8-bit weights and 8-bit activations "
            "(drop them from float_layers), or use mcu_source tflite-int8")


def _onnx_backend():
    try:
        from toolchain.export import onnx_backend
    except ModuleNotFoundError as e:
        raise ConfigError(f"the ONNX backend is not available ({e}); install the pinned onnx, tf2onnx "
                          "and onnxruntime from requirements.txt") from None
    return onnx_backend


def _build(fmt: str, model, calib_x, plan, path: Path, io, opset, qat_model=None) -> Artifact:
    spec = FORMATS.get(fmt.replace("-", "."))
    if fmt == "tflite-mixed":
        from toolchain.export.tflite_mixed import export_tflite_mixed

        return export_tflite_mixed(model, plan, path, calib_x, io=io, qat_model=qat_model)
    if spec.runtime == "tflite":
        from toolchain.export.tflite_backend import export_tflite

        variant = fmt.split("-", 1)[1]
        return export_tflite(model, variant, path, calib_x if spec.calibrated else None, io=io, plan=plan)
    onnx = _onnx_backend()
    if fmt == "onnx-fp32":
        return onnx.export_onnx_fp32(model, path, opset=opset)
    if fmt == "onnx-int8":
        return onnx.export_onnx_int8(model, calib_x, path, opset=opset)
    if fmt == "onnx-mixed":
        return onnx.export_onnx_mixed(model, calib_x, plan, path, opset=opset, qat_model=qat_model)
    raise ConfigError(f"format {fmt!r} has no builder")  # pragma: no cover - registry is closed


def export(model, dataset, formats: Union[str, Sequence[str]], out_dir, bitplan=None, *,
           io: Optional[str] = None, calibration_samples: Optional[int] = DEFAULT_CALIBRATION_SAMPLES,
           thresholds=None, verify_samples: Optional[int] = None, name: Optional[str] = None,
           mcu_source: str = "tflite-int8", onnx_opset: int = DEFAULT_ONNX_OPSET,
           qat_model=None, quiet: bool = False) -> ExportBundle:
    """Convert ``model`` into every format in ``formats``, verify each artifact in its runtime on
    ``dataset``'s evaluation split, and write them (plus ``verify.json``, ``export.json`` and, for
    ``mcu``, ``mcu/``) to ``out_dir`` — all or nothing.

    ``bitplan``: a ``BitPlan`` (needed by ``tflite-mixed`` / ``onnx-mixed``). ``io``: ``None``
    (integer I/O where the format allows it), ``"int8"`` (required) or ``"float"``.
    ``calibration_samples``: the first N train samples calibrate the integer formats (``None`` =
    all). ``thresholds``: ``{kind or format: Thresholds}`` overrides (see ``toolchain.verify``).
    ``mcu_source``: the integer TFLite format the MCU bundle is generated from (built even if not
    requested). ``qat_model``: the simulated (fake-quant) graph of ``bitplan`` that ``quantize``
    returned or wrote (``QuantizeResult.model``, ``load_qat_model(DIR/model_qat.h5)``), fine-tuned
    or not; the mixed formats convert it, so its rounded (and trained) weights are what they store.
    Without it they build the same graph from ``bitplan`` on the calibration samples. The user's
    model is never modified.
    """
    from toolchain.export.convert_worker import converter_session
    from toolchain.export.tflite_backend import check_io
    from toolchain.outdir import check_output_dir, staged_output
    from toolchain.verify import VerifyReport, verify

    requested = parse_formats(formats)
    check_io(io)
    needs_plan = [f for f in requested if FORMATS.get(f.replace("-", ".")).needs_bitplan]
    if needs_plan and bitplan is None:
        raise ConfigError(f"format(s) {', '.join(needs_plan)} need a bit plan; pass bitplan= "
                          "(CLI: --bitplan bitplan.json from `toolchain quantize`)")
    if bitplan is not None:
        bitplan.check_against(model)
    if qat_model is not None and bitplan is None:
        raise ConfigError("qat_model= is the simulated graph of a bit plan; pass its bitplan= too")
    if MCU in requested and mcu_source not in MCU_SOURCES:
        raise ConfigError(f"mcu_source {mcu_source!r} cannot feed the MCU bundle; use one of {', '.join(MCU_SOURCES)}")
    if MCU in requested and mcu_source == "tflite-mixed" and bitplan is not None:
        _check_plan_for_mcu(bitplan)
    fixed = [f for f in requested if f == MCU or FORMATS.get(f.replace("-", ".")).calibrated]
    if fixed and any(d is None for d in tuple(model.input_shape)[1:]):
        from toolchain.errors import ConversionError

        raise ConversionError(
            f"model {model.name!r} takes inputs of shape {tuple(model.input_shape)[1:]} with unknown sizes, but "
            f"{', '.join(fixed)} need a fixed input size (integer kernels and the microcontroller's static "
            f"arena are planned for one shape); rebuild the model with a fixed Input shape, e.g. Input((96, 96, 3))")
    builds = [f for f in requested if f != MCU]
    if MCU in requested and mcu_source not in builds:
        builds.append(mcu_source)
    if any(FORMATS.get(f.replace("-", ".")).runtime == "onnx" for f in builds):
        _onnx_backend()
    out_dir = check_output_dir(out_dir)
    calib_x = None
    if any(FORMATS.get(f.replace("-", ".")).calibrated for f in builds):
        n = None if calibration_samples is None else min(int(calibration_samples), len(dataset.x_train))
        calib_x, _ = dataset.calibration(n)
    base = name or artifact_name(model)

    progress = None
    if not quiet:
        from tqdm import tqdm

        progress = tqdm(total=len(builds), desc="export", unit="format")
    # one converter child process serves every TFLite conversion of this export
    with staged_output(out_dir) as stage, converter_session():
        staged: Dict[str, Artifact] = {}
        for fmt in builds:
            spec = FORMATS.get(fmt.replace("-", "."))
            variant = fmt.split("-", 1)[1]
            if progress is not None:
                progress.set_postfix_str(fmt)
            staged[fmt] = _build(fmt, model, calib_x, bitplan, stage / f"{base}_{variant}{spec.suffix}",
                                 io, onnx_opset, qat_model)
            if progress is not None:
                progress.update(1)
        if progress is not None:
            progress.close()
        report: VerifyReport = verify(list(staged.values()), model, dataset, thresholds=thresholds,
                                      samples=verify_samples, quiet=quiet)
        # artifact paths relative to the output, not the random staging folder: identical runs, identical files
        report = replace(report, checks=tuple(replace(c, path=Path(c.path).name) for c in report.checks))
        mcu = None
        if MCU in requested:
            from toolchain.export.mcu import write_mcu_bundle

            layers = (staged[mcu_source].metadata or {}).get("layers") or {}
            mcu = write_mcu_bundle(staged[mcu_source].path, stage / "mcu", base, mcu_source,
                                   layer_names={int(e["op_index"]): n for n, e in layers.items()},
                                   check_x=dataset.x_eval,
                                   # class labels give tflite-micro's accuracy; other targets do not
                                   check_y=dataset.y_eval if getattr(dataset, "is_classification", True) else None)
        final = {fmt: replace(a, path=out_dir / Path(a.path).name) for fmt, a in staged.items()}
        if mcu is not None:
            mcu = replace(mcu, out_dir=out_dir / "mcu",
                          files={k: out_dir / "mcu" / Path(v).name for k, v in mcu.files.items()})
        bundle = ExportBundle(out_dir, final, report, mcu, tuple(requested))
        write_bytes_atomic(stage / "verify.json", (report.to_json() + "\n").encode())
        manifest = _jsonable(bundle.to_dict())
        # artifact paths are relative to the folder that holds export.json; its own location (the
        # staging folder inside compress) would make identical runs write different files
        del manifest["out_dir"]
        manifest.update({"dataset": getattr(dataset, "provenance", None),
                         "calibration_samples": None if calib_x is None else int(len(calib_x)),
                         "bitplan": bitplan.to_dict() if bitplan is not None else None})
        write_bytes_atomic(stage / "export.json", (json.dumps(manifest, indent=2) + "\n").encode())
    return bundle


__all__ = ["Artifact", "ExportBundle", "FORMATS", "FormatSpec", "export", "format_names", "parse_formats"]
