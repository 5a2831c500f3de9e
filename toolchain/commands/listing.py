"""``toolchain list rules|models|datasets``: what the registries hold."""


def add_parser(sub):
    from toolchain.cli import add_common

    p = sub.add_parser("list", help="list LRP rules, zoo architectures or dataset specs")
    p.add_argument("what", choices=("rules", "models", "datasets"))
    add_common(p)
    return p


def run(args) -> int:
    if args.what == "rules":
        from toolchain.relevance import RULES

        for key in RULES:
            print(f"{key:22s} {RULES.get(key).description}")
    elif args.what == "models":
        from models import ARCHITECTURES

        for key in ARCHITECTURES:
            print(f"{key:12s} {getattr(ARCHITECTURES.get(key), 'description', '')}")
    else:
        from toolchain.data import DATASETS

        for key in DATASETS.keys():
            kind = DATASETS.get(key)
            print(f"{kind.form(key):16s} {kind.summary}")
    return 0
