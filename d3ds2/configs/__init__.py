"""Hydra configs shipped with the package (``pkg://d3ds2.configs``): train, inference, eval, data prep and tools."""
