"""Kiln compile: checkpoint -> artifact of bucketed static-shape graphs."""
__version__ = "0.1.0"
