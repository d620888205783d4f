"""d3ds2: training and research framework for Direct3D-S2-style image-to-3D generation."""
__version__ = "0.1.0"
