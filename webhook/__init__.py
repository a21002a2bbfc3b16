"""Outrigger: a mutating admission webhook that injects sidecars, ambassadors and volumes."""

__version__ = "0.1.0"
