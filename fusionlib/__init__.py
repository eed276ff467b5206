"""fusionlib: the tested library behind the Fusion book."""

__version__ = "0.1.0"
