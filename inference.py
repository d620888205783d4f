"""`python inference.py key=value ...` from a checkout: runs :mod:`d3ds2.cli.inference` (also installed as `d3ds2-inference`)."""
from d3ds2.cli.inference import main

if __name__ == "__main__":
    main()
