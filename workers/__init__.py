"""Model workers: consume requests, generate, publish token events."""

from .engine import GenerationEngine
from .models import LoadedModel, ModelLoadError, load_model
from .worker import Worker

__all__ = ["GenerationEngine", "LoadedModel", "ModelLoadError", "Worker", "load_model"]
