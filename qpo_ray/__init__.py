"""qpo_ray: QPO prompt-policy training on Ray."""
__version__ = "0.1.0"
