"""``toolchain recipe``: print the commented default recipe, or validate a recipe file."""


def add_parser(sub):
    from toolchain.cli import add_common

    p = sub.add_parser("recipe", help="print the default recipe (--example) or check a recipe file")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--example", action="store_true", help="print the commented default recipe")
    group.add_argument("--check", metavar="FILE", help="validate FILE and print the merged recipe")
    add_common(p)
    return p


def run(args) -> int:
    from toolchain.recipe import EXAMPLE, load_recipe

    if args.example:
        print(EXAMPLE, end="")
        return 0
    import yaml

    print(yaml.safe_dump(load_recipe(args.check), sort_keys=False), end="")
    return 0
