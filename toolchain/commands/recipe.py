"""``toolchain recipe``: print the commented default recipe, or validate a recipe file."""


def add_parser(sub):
    from toolchain.cli import add_common

    p = sub.add_parser("recipe", help="print the default recipe (--example) or check a recipe file")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--example", action="store_true", help="print the commented default recipe")
    group.add_argument("--check", metavar="FILE", help="validate FILE and print the merged recipe")
    p.add_argument("--target", help="with --example: the defaults for this bench target (qemu-cortex-m4/m7 "
                   "have their own); with --check: merge FILE over that target's defaults")
    add_common(p)
    return p


def run(args) -> int:
    from toolchain.recipe import example, load_recipe

    target = getattr(args, "target", None)
    if args.example:
        print(example(target), end="")
        return 0
    import yaml

    print(yaml.safe_dump(load_recipe(args.check, target), sort_keys=False), end="")
    return 0
