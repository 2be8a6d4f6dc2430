"""Tasks, samplers and data sets.

:mod:`metaphi.tasks.registry` is the one place data is found by name (or ``folder:PATH``): few-shot
benchmarks, whole labelled data sets, continual streams and multi-domain sets. Data set modules are
imported lazily, when their name is asked for.
"""
from metaphi.tasks.base import DataError, ImageClasses, Task, atomic_save
from metaphi.tasks.episodes import EpisodeSampler

__all__ = ["DataError", "ImageClasses", "Task", "EpisodeSampler", "atomic_save"]
