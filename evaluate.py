"""`python evaluate.py key=value ...` from a checkout: runs :mod:`d3ds2.cli.evaluate` (also installed as `d3ds2-evaluate`)."""
from d3ds2.cli.evaluate import main

if __name__ == "__main__":
    main()
