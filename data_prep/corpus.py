"""`python -m data_prep.corpus out=DIR n_procedural=8 seed=0 real=pyvista,pymeshfix max_faces=0`: write a corpus
of mesh files. `real`: comma-separated sources of d3ds2.geometry.corpus.REAL_SOURCES (add `pybullet` for its
~1,200 meshes), `none` for procedural shapes only; `max_faces` > 0 leaves out larger real meshes."""
import sys

from d3ds2.geometry.corpus import write_corpus


def main(argv: list[str]) -> None:
    args = {"out": None, "n_procedural": "8", "seed": "0", "real": "pyvista,pymeshfix", "max_faces": "0"}
    for a in argv:
        k, sep, v = a.partition("=")
        if not sep or k not in args:
            sys.exit(f"data_prep.corpus: bad argument {a!r}; expected key=value with key in {sorted(args)}")
        args[k] = v
    if not args["out"]:
        sys.exit("data_prep.corpus: out=DIR is required")
    real = () if args["real"] in ("none", "") else tuple(args["real"].split(","))
    max_faces = int(args["max_faces"]) or None
    try:
        paths = write_corpus(args["out"], int(args["n_procedural"]), int(args["seed"]), real, max_faces)
    except ValueError as e:
        sys.exit(f"data_prep.corpus: {e}")
    print(f"wrote {len(paths)} meshes to {args['out']}")


if __name__ == "__main__":
    main(sys.argv[1:])
