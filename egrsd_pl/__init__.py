"""egrsd-pl: entropy-gated on-policy self-distillation (EGRSD, CL-EGRSD) and its baselines in Lightning."""

__version__ = "0.1.0"
