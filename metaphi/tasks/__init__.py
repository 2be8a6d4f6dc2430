"""Tasks, samplers and data sets. Data set modules are imported lazily by name."""
from .base import DataError, ImageClasses, Task, atomic_save
from .episodes import EpisodeSampler

__all__ = ["DataError", "ImageClasses", "Task", "EpisodeSampler", "atomic_save"]
