"""``toolchain bench``: latency, memory and accuracy of one artifact on a target."""
import argparse
import json

from toolchain.cli import add_common, bounded_int, finite_seconds, positive_int
from toolchain.recipe import MAX_RUNS, MAX_THREADS


def _int_list(text: str):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, "
                                         "e.g. 1,2") from None
    if not values or any(not 1 <= v <= MAX_THREADS for v in values):
        raise argparse.ArgumentTypeError(f"{text[:40]!r} must list integers in [1, {MAX_THREADS}], e.g. 1,2")
    return tuple(values)


def _on_off_list(text: str):
    words = [w.strip().lower() for w in text.split(",") if w.strip()]
    bad = [w for w in words if w not in ("on", "off")]
    if not words or bad:
        raise argparse.ArgumentTypeError(f"{text!r} must list on and/or off, e.g. on,off")
    return tuple(w == "on" for w in words)


def add_parser(sub):
    from deploy.targets.base import DEFAULT_RUN_TIMEOUT_S
    from deploy.runner import DEFAULT_RUNS, DEFAULT_WARMUP

    p = sub.add_parser(
        "bench", help="measure an artifact's latency, memory and accuracy on a target",
        description="Measure a .tflite/.onnx artifact (or a Keras model, locally) with the same "
                    "runner on this machine, a board over SSH or an emulated Raspberry Pi.")
    p.add_argument("--artifact", required=True,
                   help=".tflite or .onnx file; a .keras/.h5 model or SavedModel runs locally")
    p.add_argument("--data", help="dataset spec whose evaluation split is fed (digits, kws01, "
                                  "npz:PATH, ...); default: seeded random inputs, no accuracy")
    p.add_argument("--data-dir", help="where cached Keras datasets live")
    p.add_argument("--samples", type=positive_int, help="first N evaluation samples (default all)")
    p.add_argument("--target", default="local",
                   help="local (default), ssh://[user@]host[:port] (or ssh://ALIAS from "
                        "~/.ssh/config), emulated-pi4 or emulated-pi5")
    p.add_argument("--runs", type=bounded_int(1, MAX_RUNS), default=DEFAULT_RUNS,
                   help=f"timed single-sample inferences per configuration (default "
                        f"{DEFAULT_RUNS})")
    p.add_argument("--warmup", type=bounded_int(0, MAX_RUNS), default=DEFAULT_WARMUP,
                   help=f"untimed inferences first (default {DEFAULT_WARMUP})")
    p.add_argument("--threads", type=_int_list, default=(1,),
                   help="runtime threads, comma-separated (default 1), e.g. 1,2")
    p.add_argument("--xnnpack", type=_on_off_list,
                   help="TFLite only: XNNPACK delegate on, off or on,off (default on)")
    p.add_argument("--timeout", type=finite_seconds, default=DEFAULT_RUN_TIMEOUT_S,
                   help=f"seconds one configuration may take (default {DEFAULT_RUN_TIMEOUT_S:g})")
    p.add_argument("--ssh-config", help="ssh config file for ssh:// targets (ssh -F; default "
                                        "~/.ssh/config)")
    p.add_argument("--remote-python", default="python3",
                   help="Python on the SSH device (default python3)")
    p.add_argument("--connect-timeout", type=positive_int, default=10,
                   help="SSH connect timeout in seconds (default 10)")
    p.add_argument("--rootfs", help="emulated targets: where the arm64 rootfs is cached "
                                    "(default $TOOLCHAIN_ROOTFS_DIR or "
                                    "~/.cache/toolchain/rootfs-bookworm-arm64)")
    p.add_argument("--trust-model", action="store_true",
                   help="Keras models: allow Lambda layers and custom objects")
    p.add_argument("--out", required=True, help="output directory (bench.json, bench.md, "
                                                "bench.png, inputs.npz)")
    add_common(p)
    return p


def run(args) -> int:
    from deploy import bench

    if args.warmup < 0:
        from toolchain.errors import ConfigError

        raise ConfigError(f"--warmup {args.warmup} is not allowed; pass 0 or more")
    result = bench(args.artifact, target=args.target, data=args.data, data_dir=args.data_dir,
                   samples=args.samples, runs=args.runs, warmup=args.warmup,
                   threads=args.threads, xnnpack=args.xnnpack, out=args.out,
                   timeout_s=args.timeout, trust_model=args.trust_model, quiet=args.quiet,
                   config_file=args.ssh_config, remote_python=args.remote_python,
                   connect_timeout=args.connect_timeout, rootfs_dir=args.rootfs)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    print(result.to_markdown())
    print(f"wrote {args.out}/bench.json, bench.md, bench.png, inputs.npz")
    return 0
