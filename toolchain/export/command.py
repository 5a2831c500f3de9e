"""``toolchain export``: TFLite / ONNX artifacts and an MCU bundle, each verified in its runtime."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from toolchain.cli import add_common, add_model_data, positive_int


def add_parser(sub):
    p = sub.add_parser("export", help="TFLite / ONNX artifacts + MCU bundle, verified in their runtimes")
    add_model_data(p)
    p.add_argument("--formats", required=True,
                   help="comma-separated formats: tflite-fp32, tflite-fp16, tflite-dynamic, tflite-int8, "
                        "tflite-int16x8, tflite-sparse, tflite-mixed, onnx-fp32, onnx-int8, onnx-mixed, mcu")
    p.add_argument("--bitplan", help="bitplan.json from `toolchain quantize` (needed by tflite-mixed, onnx-mixed); "
                                     "the model_qat.h5 beside it (the simulated, possibly fine-tuned graph) is "
                                     "what those formats convert")
    p.add_argument("--out", required=True, help="output directory (written completely or not at all)")
    p.add_argument("--io", choices=("int8", "float"),
                   help="model I/O of integer formats (default: integer where the format allows it)")
    p.add_argument("--calibration-samples", type=positive_int, default=500,
                   help="first N train samples calibrate the integer formats (default 500)")
    p.add_argument("--verify-samples", type=positive_int,
                   help="verify on the first N evaluation samples (default: all)")
    p.add_argument("--thresholds", help='JSON file of verification thresholds, e.g. '
                                        '{"int8": {"min_agreement": 0.95}, "tflite-fp16": {"max_abs_diff": 0.02}}')
    p.add_argument("--name", help="base name of the files and of the C arrays (default: the model's name)")
    p.add_argument("--mcu-source", default="tflite-int8",
                   help="integer TFLite format the MCU bundle is made from (default tflite-int8)")
    p.add_argument("--onnx-opset", type=positive_int, default=13, help="tf2onnx opset, 13..18 (default 13)")
    add_common(p)
    return p


def load_thresholds(path: Optional[str]):
    if not path:
        return None
    from toolchain.errors import ConfigError
    from toolchain.verify import thresholds_from_dict

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"thresholds file {p} does not exist; pass a JSON file such as "
                          '{"int8": {"min_agreement": 0.95}}')
    try:
        data = json.loads(p.read_bytes().decode("utf-8"), parse_constant=_refuse_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"thresholds file {p} is not valid JSON ({str(e)[:120]}); fix it") from None
    except RecursionError:
        raise ConfigError(f"thresholds file {p} is nested too deeply to be a thresholds file; pass "
                          '{"int8": {"min_agreement": 0.95}}') from None
    if not isinstance(data, dict):
        raise ConfigError(f"thresholds file {p} must hold a JSON object keyed by kind or format")
    bad = [f"{kind}.{field}: {str(v)[:40]!r}" for kind, fields in data.items() if isinstance(fields, dict)
           for field, v in fields.items()
           if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v))]
    if bad:
        raise ConfigError(f"thresholds file {p}: {', '.join(bad[:5])} must be finite numbers (or null); "
                          "fix these values")
    return thresholds_from_dict(data)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a threshold")


def run_export(model_path: str, data_spec: str, formats: str, out: str, bitplan_path: Optional[str] = None,
               io: Optional[str] = None, calibration_samples: Optional[int] = 500,
               verify_samples: Optional[int] = None, thresholds_path: Optional[str] = None,
               name: Optional[str] = None, mcu_source: str = "tflite-int8", onnx_opset: int = 13,
               trust_model: bool = False, quiet: bool = False, data_dir: Optional[str] = None):
    """Everything cheap is checked before the model is loaded: formats, output dir, plan, thresholds."""
    from toolchain.export import export, parse_formats
    from toolchain.outdir import check_artifact_name, check_output_dir
    from toolchain.pipeline import load_inputs
    from toolchain.quantize.bitplan import BitPlan

    fmts = parse_formats(formats)
    check_output_dir(out, inputs=[model_path, bitplan_path, thresholds_path])
    check_artifact_name(name)
    plan = BitPlan.load(bitplan_path) if bitplan_path else None
    thresholds = load_thresholds(thresholds_path)
    model, dataset = load_inputs(model_path, data_spec, None, trust_model, data_dir)
    qat_model = None
    if bitplan_path:  # the graph `toolchain quantize` simulated (and fine-tuned) beside its plan
        from toolchain.quantize.simulate import QAT_MODEL_FILE, load_qat_model

        simulated = Path(bitplan_path).parent / QAT_MODEL_FILE
        qat_model = load_qat_model(simulated) if simulated.is_file() else None
    from toolchain.errors import ConversionError

    try:
        return export(model, dataset, fmts, out, bitplan=plan, io=io, calibration_samples=calibration_samples,
                      thresholds=thresholds, verify_samples=verify_samples, name=name, mcu_source=mcu_source,
                      onnx_opset=onnx_opset, qat_model=qat_model, quiet=quiet)
    except ConversionError as e:  # name the user's file, not only the in-memory model
        raise ConversionError(f"{model_path}: {e}") from None


def run(args) -> int:
    bundle = run_export(args.model, args.data, args.formats, args.out, args.bitplan, args.io,
                        args.calibration_samples, args.verify_samples, args.thresholds, args.name,
                        args.mcu_source, args.onnx_opset, args.trust_model, args.quiet, args.data_dir)
    if args.json:
        print(json.dumps(json.loads((Path(args.out) / "export.json").read_text()), indent=2))
        return 0
    print(bundle.table())
    task = getattr(bundle.verify, "task", "classification")
    reference = (f"Keras accuracy {bundle.verify.reference_accuracy:.4f}" if task == "classification"
                 else f"task {task}: judged by the error against the targets")
    print(f"\nverified on {bundle.verify.samples} {bundle.verify.split} samples "
          f"({reference}); wrote {args.out}/ "
          "(artifacts, verify.json, export.json" + (", mcu/" if bundle.mcu is not None else "") + ")")
    return 0
