"""`python -m data_prep.corpus out=DIR n_procedural=8 seed=0 real=true`: write the demo corpus as mesh files."""
import sys

from d3ds2.geometry.corpus import write_corpus


def main(argv: list[str]) -> None:
    args = {"out": None, "n_procedural": "8", "seed": "0", "real": "true"}
    for a in argv:
        k, sep, v = a.partition("=")
        if not sep or k not in args:
            sys.exit(f"data_prep.corpus: bad argument {a!r}; expected key=value with key in {sorted(args)}")
        args[k] = v
    if not args["out"]:
        sys.exit("data_prep.corpus: out=DIR is required")
    paths = write_corpus(args["out"], int(args["n_procedural"]), int(args["seed"]), args["real"].lower() == "true")
    print(f"wrote {len(paths)} meshes to {args['out']}")


if __name__ == "__main__":
    main(sys.argv[1:])
