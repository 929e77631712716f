"""blackbox-rs: certified robustness for opaque image classifiers."""

from blackbox_rs._version import __version__

__all__ = ["__version__"]
