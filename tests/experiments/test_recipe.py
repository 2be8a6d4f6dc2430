"""`metaphi run`'s recipes: what a run decides where the command line leaves a setting open."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from metaphi.algorithms.protonet import CHARACTER_RECIPE, FOLDER_CHARACTER_RECIPE, IMAGE_RECIPE, defaults
from metaphi.experiments.fewshot import RunConfig, complete, describe_choices, load_benchmark
from tiny import bar_drawing, tiny_benchmark


def character_folder(root, classes=24, per_class=8, size=28):
    """Dark bars on white paper, one class folder each: what a user's folder of characters looks like."""
    for c in range(classes):
        d = root / f"char{c:02d}"
        d.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(bar_drawing(c, i, classes, size)).save(d / f"{i}.png")
    return root


def colour_folder(root, classes=9, per_class=4):
    g = torch.Generator().manual_seed(0)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(20, 20, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels, "RGB").save(d / f"{i}.png")
    return root


def resolved(**given):
    config = RunConfig(**given)
    benchmark = load_benchmark(config)
    return complete(config, benchmark), benchmark


def test_protonet_recipe_follows_the_paper_and_is_capped_by_the_data():
    characters = defaults({"images": True, "characters": True, "train_classes": 400, "train_class_images": 20,
                           "image_size": 28})
    assert characters == CHARACTER_RECIPE == {"train_ways": 60, "query": 5, "meta_batch": 1, "pool": "max"}
    other = defaults({"images": True, "train_classes": 64, "train_class_images": 600, "image_size": 84})
    assert other == IMAGE_RECIPE and other["train_ways"] == 30 and other["query"] == 15
    # fewer classes than the recipe's ways, few images per class, images too small for four poolings
    small = defaults({"images": True, "characters": True, "train_classes": 12, "train_class_images": 4,
                      "shots": 1, "image_size": 12})
    assert small == {"train_ways": 12, "query": 3, "meta_batch": 1}
    folder = defaults({"images": True, "characters": True, "folder": True, "train_classes": 436,
                       "train_class_images": 20, "image_size": 28})
    assert folder == {**CHARACTER_RECIPE, **FOLDER_CHARACTER_RECIPE}
    assert defaults({"images": False}) == {}


def test_a_character_folder_gets_protonets_recipe_and_says_so(tmp_path):
    folder = character_folder(tmp_path / "chars")
    config, benchmark = resolved(algorithm="protonet", benchmark=f"folder:{folder}", deploy=True)
    assert benchmark.characters and benchmark.training == {"rotations": True, "reflections": False, "augment": True,
                                                               "augment_elastic": 0.0, "within_group": 0.0}
    train_classes = benchmark.num_classes("train")
    assert train_classes == 4 * 19  # 80% of 24 classes, each in four rotations
    assert config.rotations is True and config.pool == "max"
    assert config.train_ways == min(60, train_classes) and config.query == 5 and config.meta_batch == 1
    assert config.lr_schedule == "constant" and config.augment is True
    assert config.iterations == FOLDER_CHARACTER_RECIPE["iterations"]
    # tests keep the folder's own query size; only training episodes follow the recipe
    assert config.eval_query == 1
    line = describe_choices(RunConfig(algorithm="protonet", benchmark=f"folder:{folder}"), config)
    for words in ("60-way training episodes (--train-ways)", "5 queries per class (--query)",
                  "rotations as new classes (--rotations)", "max pooling (--pool)", "(--lr-schedule)",
                  f"{config.iterations} iterations (--iterations)"):
        assert words in line, line


def test_flags_override_every_part_of_the_recipe(tmp_path):
    folder = character_folder(tmp_path / "chars")
    given = dict(algorithm="protonet", benchmark=f"folder:{folder}", rotations=False, augment=True, pool="stride",
                 lr_schedule="constant", train_ways=7, query=2, meta_batch=3, iterations=4)
    config, benchmark = resolved(**given)
    assert benchmark.training == {"rotations": False, "reflections": False, "augment": True, "augment_elastic": 0.0,
                                  "within_group": 0.0}
    assert benchmark.num_classes("train") == 14  # 60% of 24 classes, not rotated
    for key, value in given.items():
        if key != "benchmark":
            assert getattr(config, key) == value, key
    line = describe_choices(RunConfig(**given), config)
    assert "--ways" in line  # left open, so chosen
    for flag in ("--train-ways", "--rotations", "--augment", "--pool", "--lr-schedule", "--iterations", "--query"):
        assert flag not in line, line


def test_maml_on_characters_rotates_but_keeps_its_own_network_and_schedule(tmp_path):
    folder = character_folder(tmp_path / "chars")
    config, benchmark = resolved(algorithm="maml", benchmark=f"folder:{folder}")
    assert config.rotations is True and benchmark.training["rotations"]
    assert config.pool == "stride" and config.lr_schedule == "constant" and config.train_ways is None


def test_colour_images_are_not_characters_and_are_not_rotated(tmp_path):
    folder = colour_folder(tmp_path / "colour")
    config, benchmark = resolved(algorithm="protonet", benchmark=f"folder:{folder}", image_size=20)
    assert not benchmark.characters and config.rotations is False
    assert benchmark.num_classes("train") == 5  # 60% of 9: no rotations
    assert config.train_ways == 5 and config.query == 3  # the recipe's 30 ways and 15 queries, capped


def test_a_benchmark_already_rotated_is_not_rotated_again():
    bench = tiny_benchmark()
    bench = dataclasses.replace(bench, characters=True)
    assert bench.rotates_by_default()
    rotated = bench.with_training(rotations=True)
    assert not dataclasses.replace(rotated, training={}).rotates_by_default()


def test_with_backbone_chooses_the_pooling_of_the_models():
    bench = tiny_benchmark(size=16)
    assert bench.model(3).pool == "stride"
    assert bench.with_backbone(pool="max").model(3).pool == "max"
    assert bench.with_backbone(pool=None) is bench
    x = torch.rand(2, 1, 16, 16)
    assert bench.with_backbone(pool="max").model(3)(x).shape == (2, 3)


def test_every_setting_given_is_reported_as_such(tmp_path):
    folder = character_folder(tmp_path / "chars")
    given = RunConfig(algorithm="protonet", benchmark=f"folder:{folder}", ways=3, shots=1, train_ways=6, query=2,
                      meta_batch=1, rotations=True, reflections=False, augment=False, pool="max",
                      lr_schedule="constant", iterations=1)
    config = complete(given, load_benchmark(given))
    assert describe_choices(given, config).endswith("every setting as given")


def test_run_prints_the_recipe_it_chose(tmp_path, capsys):
    from metaphi.cli import main

    folder = character_folder(tmp_path / "chars")
    assert main(["run", "protonet", "--benchmark", f"folder:{folder}", "--deploy", "--iterations", "2",
                 "--val-every", "1", "--val-tasks", "2", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "chosen where not given" in err and "60-way training episodes (--train-ways)" in err
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "pool: max" in saved and "rotations: true" in saved and "train_ways: 60" in saved


@pytest.mark.parametrize("pool", ["stride", "max", "max3"])
def test_predict_rebuilds_the_pooling_a_run_chose(tmp_path, pool):
    from metaphi.algorithms import build_algorithm
    from metaphi.cli import main
    from metaphi.train import load_checkpoint

    folder = character_folder(tmp_path / "chars", classes=10, per_class=4)  # 6 train, 2 val, 2 test
    assert main(["run", "protonet", "--benchmark", f"folder:{folder}", "--pool", pool, "--ways", "2", "--iterations", "1",
                 "--eval-tasks", "2", "--val-tasks", "1", "--no-baselines", "--quiet",
                 "--out", str(tmp_path / "run")]) == 0
    ck = load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))
    assert build_algorithm(ck["algorithm"]).model.pool == pool


@pytest.mark.parametrize("name", ["ssl-rotation", "ssl-simclr"])
def test_self_supervised_pretraining_does_not_rotate_classes(tmp_path, name):
    folder = character_folder(tmp_path / "chars")
    config, benchmark = resolved(algorithm=name, benchmark=f"folder:{folder}")
    assert config.rotations is False and benchmark.num_classes("train") == 14
    config, benchmark = resolved(algorithm=name, benchmark=f"folder:{folder}", rotations=True)
    assert config.rotations is True and benchmark.num_classes("train") == 56


def test_within_alphabet_training_episodes_on_a_grouped_folder(tmp_path, capsys):
    """PATH/<alphabet>/<character>/<image>: --train-within-alphabet draws that fraction of the training
    episodes from one alphabet; a flat folder has no alphabets to draw from and is refused."""
    from metaphi.cli import main

    grouped = tmp_path / "grouped"
    for c, d in enumerate(sorted(character_folder(tmp_path / "moved", classes=24, per_class=4).iterdir())):
        (grouped / ("a" if c < 12 else "b")).mkdir(parents=True, exist_ok=True)
        d.rename(grouped / ("a" if c < 12 else "b") / d.name)
    flat = character_folder(tmp_path / "flat", classes=24, per_class=4)
    config, benchmark = resolved(algorithm="protonet", benchmark=f"folder:{grouped}", deploy=True, ways=3,
                                 train_within_alphabet=1.0, train_ways=5)
    assert config.train_within_alphabet == 1.0 and benchmark.training["within_group"] == 1.0
    assert f"folder:{grouped}: 24 classes in 2 groups (19 train, 5 val, no test: deploy)" in benchmark.description
    train = benchmark.splits["train"]
    assert set(train.groups) == {"a", "b"} and all(n.startswith(g + "/") for n, g in zip(train.classes, train.groups))
    sampler = benchmark.episodes("train", 5, 1, 1)
    assert sampler.within_group == 1.0
    g = torch.Generator().manual_seed(0)
    for _ in range(10):  # every class of an episode in one alphabet: the rotations keep the group
        assert len({train.groups[int(c)] for c in sampler._classes(g)}) == 1
    # validation episodes are drawn across alphabets, unless --within-alphabet
    assert benchmark.episodes("val", 3, 1, 1).within_group == 0.0
    _, within = resolved(algorithm="protonet", benchmark=f"folder:{grouped}", deploy=True, ways=2, within_alphabet=True,
                         val_fraction=0.5)
    assert within.training["within_group"] == 0.0 and within.episodes("val", 2, 1, 1).within_group == 1.0
    capsys.readouterr()
    out = tmp_path / "run"
    assert main(["run", "protonet", "--benchmark", f"folder:{grouped}", "--deploy", "--ways", "3", "--train-ways", "5",
                 "--train-within-alphabet", "0.5", "--iterations", "2", "--eval-tasks", "2", "--quiet",
                 "--out", str(out)]) == 0
    assert "train_within_alphabet: 0.5" in (out / "config.yaml").read_text()
    run = ["run", "protonet", "--benchmark", f"folder:{grouped}", "--deploy", "--ways", "3", "--train-ways", "5",
           "--eval-tasks", "2", "--quiet", "--out", str(out), "--resume"]
    capsys.readouterr()
    assert main([*run, "--iterations", "3"]) == 2  # resumed without the checkpoint's fraction
    assert "--train-within-alphabet 0.5 (this run: none)" in capsys.readouterr().err
    assert main([*run, "--iterations", "3", "--train-within-alphabet", "0.5"]) == 0
    for folder, flags, words in [(flat, ["--train-within-alphabet", "1"], "within-group training episodes need classes "
                                                                         "in groups"),
                                 (grouped, ["--train-within-alphabet", "1.5"], "--train-within-alphabet must be in "
                                                                               "[0, 1], got 1.5")]:
        assert main(["run", "protonet", "--benchmark", f"folder:{folder}", "--deploy", "--ways", "3", *flags,
                     "--iterations", "1", "--out", str(tmp_path / "refused")]) == 2
        assert words in capsys.readouterr().err
        assert not (tmp_path / "refused").exists()
