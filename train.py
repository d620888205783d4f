"""`python train.py key=value ...` from a checkout: runs :mod:`d3ds2.cli.train` (also installed as `d3ds2-train`)."""
from d3ds2.cli.train import main

if __name__ == "__main__":
    main()
