"""hfdist: hyperfit causal language models (Carlsson et al., ICLR 2025), from a laptop to 70B across nodes."""

__version__ = "0.1.0"
