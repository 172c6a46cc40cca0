"""flowseg: generative semantic segmentation by pixel-space flow matching."""

__version__ = "0.1.0"
