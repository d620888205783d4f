"""Entry points (Hydra mains) installed as console scripts; the repository root's train.py, inference.py and
evaluate.py run them. Nothing in the library imports this package."""
