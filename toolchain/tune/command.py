"""``toolchain tune``: search recipes for a device under constraints (Ray Tune + Optuna TPE)."""
import json


def add_parser(sub):
    from toolchain.cli import add_common, add_model_data, finite_seconds, positive_int

    p = sub.add_parser("tune", help="search recipes for the best one on a device under constraints (Ray Tune)",
                       description="Search compress recipes with Ray Tune and Optuna's TPE for the Pareto front of "
                                   "size, the task's metric and latency under --constraint limits; writes OUT/front.md, "
                                   "front.png, trials.json and best.yaml (for `toolchain compress --recipe`).")
    add_model_data(p)
    p.add_argument("--target", default="local",
                   help="where latency is measured: local | ssh://[user@]host[:port] | emulated-pi4 | emulated-pi5 | "
                        "qemu-cortex-m4 | qemu-cortex-m7 (EMULATED INSTRUCTION COUNTS)")
    p.add_argument("--constraint", action="append", default=[], metavar="NAME<=VALUE",
                   help="repeatable: flash<=32KB (B, KB, KiB, MB), ram<=20KiB (MCU arena), latency<=5ms (us, ms, s), "
                        "instructions<=8M (qemu-cortex-m), drop<=1 (points of the task's metric vs the original)")
    p.add_argument("--trials", type=positive_int, default=12, help="recipes to try (default 12)")
    p.add_argument("--objective", default="metric", choices=("metric", "size", "latency", "instructions"),
                   help="what the best recipe minimises among those meeting every constraint (default: metric, "
                        "the drop against the original)")
    p.add_argument("--recipe", help="base recipe: the keys it sets stay fixed, the others are searched")
    p.add_argument("--address", help="an existing Ray cluster: auto or ray://HOST:PORT (default: Ray starts "
                                     "inside this command on this machine's cores)")
    p.add_argument("--workers", type=positive_int, help="trials at a time (default: the cluster's CPUs)")
    p.add_argument("--seed", type=int, default=0, help="TPE sampler seed")
    p.add_argument("--time-budget", type=finite_seconds, metavar="SECONDS",
                   help="end the search after this long (like Ctrl+C: the finished trials are reported, "
                        "--resume continues)")
    p.add_argument("--out", help="output directory (default build/tune-<model name>)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted search in --out")
    add_common(p)
    return p


def run(args) -> int:
    from toolchain.tune.search import tune

    task = getattr(args, "task", None)
    result = tune(args.model, args.data, target=args.target, constraints=args.constraint, trials=args.trials,
                  recipe=args.recipe, out=args.out, address=args.address, workers=args.workers, resume=args.resume,
                  objective=args.objective, trust_model=args.trust_model, data_dir=args.data_dir,
                  task=None if task == "auto" else task, seed=args.seed, quiet=args.quiet or args.json,
                  time_budget_s=args.time_budget)
    if args.json:
        print(json.dumps({"out": str(result.out_dir), "best": result.best and result.best["trial_id"],
                          "best_recipe": str(result.best_recipe) if result.best_recipe else None,
                          "front": [r["trial_id"] for r in result.front], "latency": result.latency_note},
                         indent=2, default=str))
        return 0
    print(f"{len(result.trials)} trials, {len(result.front)} on the front; {result.latency_note}")
    if result.best is None:
        print(f"no recipe met every constraint; see {result.out_dir / 'front.md'}")
        return 3
    n = result.best["numbers"]
    print(f"best: trial {result.best['trial_id']}: flash {n['flash_bytes']:,} B, {n['metric']} {n['value']:.4f} "
          f"({-n['drop_points']:+.2f} points vs the original)")
    print(f"recipe: {result.best_recipe} (toolchain compress --recipe {result.best_recipe}); "
          f"front: {result.out_dir / 'front.md'}")
    return 0
