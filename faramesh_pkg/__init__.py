"""Faramesh: policy enforcement, provenance and OS confinement for AI agents."""

__version__ = "0.1.0"
