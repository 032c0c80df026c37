"""SFO Pipeline: Subject Fidelity Optimization (arXiv 2506.03621) as a DVC pipeline."""
__version__ = "0.1.0"
