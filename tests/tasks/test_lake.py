import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from metaphi.tasks import DataError, ImageClasses, lake, omniglot
import shared_data

REAL = shared_data.OMNIGLOT


def drawing(char: int, drawer: int) -> bytes:
    """A small 1-bit PNG, black ink on white, whose ink position encodes (character, drawer)."""
    img = Image.new("1", (28, 28), 1)
    x, y = 1 + 2 * (char % 12), 1 + 2 * (drawer % 12)
    ImageDraw.Draw(img).rectangle([x, y, x + 3, y + 3], fill=0)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def make_archive(path: Path, alphabets: dict[str, dict[int, list[int]] | int], drawers: int = 4) -> Path:
    """Omniglot's layout, <top>/<Alphabet>/characterNN/<id>_<drawer>.png, zipped. An alphabet is a
    number of characters (each drawn by drawers 1..``drawers``) or {character: [its drawers]}."""
    top = path.name.removesuffix(".zip")
    char_id = 0
    with zipfile.ZipFile(path, "w") as z:
        for alphabet, spec in alphabets.items():
            chars = spec if isinstance(spec, dict) else {c: list(range(1, drawers + 1)) for c in range(1, spec + 1)}
            for c, who in chars.items():
                char_id += 1
                for d in who:
                    z.writestr(f"{top}/{alphabet}/character{c:02d}/{char_id:04d}_{d:02d}.png", drawing(char_id, d))
    return path


@pytest.fixture
def archive(tmp_path):
    return make_archive(tmp_path / "images_background_small2.zip", {"Big": 25, "Small": 5})


def data_of(path, tmp_path):
    return lake.from_source(path, image_size=28, cache_dir=tmp_path / "cache")


def test_drawers_are_read_from_the_file_names_in_load_order(archive, tmp_path):
    data = data_of(archive, tmp_path)
    names = [key[2] for key, _ in omniglot.listing(archive)]
    assert data.drawers.tolist() == [int(n[5:7]) for n in names]
    assert sorted(set(data.drawers.tolist())) == [1, 2, 3, 4]
    # image i is the drawing its name says: the store's image equals the decoded file
    store = omniglot.load(archive, cache_dir=tmp_path / "cache")
    with zipfile.ZipFile(archive) as z:
        key, member = omniglot.listing(archive)[37]
        img = Image.open(io.BytesIO(z.read(member))).convert("L")
    assert torch.equal(store.images[37, 0], 255 - torch.from_numpy(np.array(img, dtype=np.uint8)))
    assert omniglot.drawer_of("0709_05.png") == 5
    with pytest.raises(DataError, match="drawer"):
        omniglot.drawer_of("character.png")


def test_problem_structure(archive, tmp_path):
    data = data_of(archive, tmp_path)
    store = data.store
    problems = lake.lake_problems(data, ["Big", "Small"], 6, torch.Generator().manual_seed(0))
    assert [p.alphabet for p in problems] == ["Big"] * 6 + ["Small"] * 6
    seen_sets = set()
    for p in problems:
        n = 20 if p.alphabet == "Big" else 5
        assert p.ways == n and len(set(p.classes)) == n
        assert all(c.startswith(p.alphabet + "/") for c in p.classes)  # within one alphabet
        assert p.support_drawer != p.query_drawer
        assert data.drawers[p.support_indices].eq(p.support_drawer).all()
        assert data.drawers[p.query_indices].eq(p.query_drawer).all()
        (xs, ys), (xq, yq) = p.task
        assert xs.shape == (n, 1, 28, 28) and xq.shape == (n, 1, 28, 28)
        assert ys.tolist() == list(range(n))  # one support drawing per class
        assert sorted(yq.tolist()) == list(range(n))  # one query drawing per class
        # each label names the class its image is a drawing of
        for x, y, idx in ((xs, ys, p.support_indices), (xq, yq, p.query_indices)):
            assert [store.classes[int(t)] for t in store.targets[idx]] == [p.classes[int(c)] for c in y]
            assert torch.equal(x, store.images[idx].float() / 255)
        seen_sets.add(tuple(p.classes))
    big = [p for p in problems if p.alphabet == "Big"]
    assert len({tuple(p.classes) for p in big}) > 1  # 20 of 25 characters, drawn anew per problem
    assert any(p.task.query[1].tolist() != list(range(p.ways)) for p in problems)  # queries shuffled


def test_deterministic_for_a_seeded_generator(archive, tmp_path):
    data = data_of(archive, tmp_path)

    def draw(seed):
        return lake.lake_problems(data, None, 4, torch.Generator().manual_seed(seed))

    a, b, c = draw(3), draw(3), draw(4)
    assert [p.alphabet for p in a] == ["Big"] * 4 + ["Small"] * 4  # None: every alphabet, in store order
    for p, q in zip(a, b):
        assert (p.classes, p.support_drawer, p.query_drawer) == (q.classes, q.support_drawer, q.query_drawer)
        assert torch.equal(p.query_indices, q.query_indices) and torch.equal(p.task.query[0], q.task.query[0])
    assert any(not torch.equal(p.query_indices, q.query_indices) for p, q in zip(a, c))


def test_clear_errors(tmp_path):
    src = make_archive(tmp_path / "x.zip", {
        "Lone": 1,
        "Apart": {1: [1, 2], 2: [3, 4]},  # no drawer drew both characters
        "One": {1: [1, 2], 2: [2, 3]},  # one common drawer: support and query cannot differ
        "Fine": 3,
    })
    data = data_of(src, tmp_path)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(DataError, match="'Klingon' is not in the data"):
        lake.lake_problems(data, ["Klingon"], 1, g)
    with pytest.raises(DataError, match="'Lone' has 1 character"):
        lake.lake_problems(data, ["Lone"], 1, g)
    for alphabet in ("Apart", "One"):
        with pytest.raises(DataError, match=f"'{alphabet}'.*in common; a problem needs two"):
            lake.lake_problems(data, [alphabet], 1, g)
    with pytest.raises(DataError, match="per_alphabet"):
        lake.lake_problems(data, ["Fine"], 0, g)
    assert len(lake.lake_problems(data, ["Fine"], 2, g)) == 2
    ungrouped = ImageClasses(data.store.images, data.store.targets, data.store.classes)
    with pytest.raises(DataError, match="grouped by alphabet"):
        lake.lake_problems(lake.DrawnCharacters(ungrouped, data.drawers), ["Fine"], 1, g)
    with pytest.raises(DataError, match="one drawer per image"):
        lake.lake_problems(lake.DrawnCharacters(data.store, data.drawers[:3]), ["Fine"], 1, g)


def test_unseen_alphabets_from_archive_names(tmp_path):
    first = make_archive(tmp_path / "images_background_small1.zip", {"Greek": 2, "Latin": 2, "Korean": 2})
    second = make_archive(tmp_path / "images_background_small2.zip", {"Greek": 2, "Latin": 2, "Tagalog": 2,
                                                                       "Sanskrit": 2})
    assert omniglot.alphabets(second) == ["Greek", "Latin", "Sanskrit", "Tagalog"]
    assert lake.unseen_alphabets(omniglot.alphabets(first), omniglot.alphabets(second)) == ["Sanskrit", "Tagalog"]
    with pytest.raises(DataError, match="nothing unseen"):
        lake.unseen_alphabets(omniglot.alphabets(second), ["Greek", "Latin"])


@pytest.mark.skipif(not (REAL / "images_background_small2.zip").exists(),
                    reason=f"the Omniglot minimal splits are not in {REAL} (set $METAPHI_OMNIGLOT to their folder)")
def test_real_small2_only_alphabets_and_problems():
    small1, small2 = omniglot.find(REAL, "small1"), omniglot.find(REAL, "small2")
    unseen = lake.unseen_alphabets(omniglot.alphabets(small1), omniglot.alphabets(small2))
    assert unseen == ["Japanese_(katakana)", "Sanskrit", "Tagalog"]
    data = lake.read(REAL, "small2")
    assert sorted(set(data.drawers.tolist())) == list(range(1, 21))
    problems = lake.lake_problems(data, unseen, 1, torch.Generator().manual_seed(0))
    assert [p.ways for p in problems] == [20, 20, 17]  # Tagalog has 17 characters
