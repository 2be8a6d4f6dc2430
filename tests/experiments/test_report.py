"""Result files: strict JSON, written atomically."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from metaphi.experiments.report import strict, write_json


def strict_load(path):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def test_non_finite_numbers_are_written_as_null(tmp_path):
    path = tmp_path / "result.json"
    write_json({"mean": float("nan"), "per_step": [0.5, float("inf"), np.float64("-inf")],
                "best": {"val": float("nan"), "iteration": 3}, "pair": (1.0, math.nan)}, str(path))
    assert strict_load(path) == {"mean": None, "per_step": [0.5, None, None], "best": {"val": None, "iteration": 3},
                                 "pair": [1.0, None]}
    assert os.listdir(tmp_path) == ["result.json"]


def test_finite_values_are_kept_as_they_are():
    obj = {"a": 1, "b": 0.25, "c": "nan", "d": None, "e": [True, 2.5e-300]}
    assert strict(obj) == obj


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "result.json"
    write_json({"mean": 0.5}, str(path))
    with pytest.raises(TypeError):
        write_json({"mean": object()}, str(path))
    assert strict_load(path) == {"mean": 0.5}
    assert os.listdir(tmp_path) == ["result.json"]
