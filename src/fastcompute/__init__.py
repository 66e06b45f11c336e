"""fastcompute: the per-host compute agent."""

__version__ = "0.1.0"
