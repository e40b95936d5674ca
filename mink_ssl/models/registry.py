"""The model registry (kept apart so that model files can register without import cycles)."""
from mink_ssl.registry import Registry

MODELS: Registry = Registry("model")
