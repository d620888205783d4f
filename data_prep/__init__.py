"""Data preparation entry points: `python -m data_prep` (meshes -> shards), `python -m data_prep.corpus`."""
