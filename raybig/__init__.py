"""raybig: distributed PyTorch training on Ray from one YAML job spec."""
__version__ = "0.1.0"
