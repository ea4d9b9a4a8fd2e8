"""The package version, in a module of its own so that low modules can import it without
importing the package (``from . import __version__`` would run ``shift_edit/__init__``)."""

__version__ = "0.1.0"
