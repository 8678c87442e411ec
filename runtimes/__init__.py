"""Runners: one protocol, one per backend. Backend libraries are imported only inside their runner."""
from .base import BackendUnavailable, InputError, Runner, TensorSpec, check_feeds

__all__ = ["BackendUnavailable", "InputError", "Runner", "TensorSpec", "check_feeds"]
