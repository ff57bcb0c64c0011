"""The prediction service that every replica of the cluster runs."""

__version__ = "0.1.0"
