"""Tasks, samplers and data sets. Data set modules are imported lazily by name."""
from metaphi.tasks.base import DataError, ImageClasses, Task, atomic_save
from metaphi.tasks.episodes import EpisodeSampler

__all__ = ["DataError", "ImageClasses", "Task", "EpisodeSampler", "atomic_save"]
