"""glyphs: a built-in, procedurally generated, Omniglot-like few-shot data set (no download).

How a glyph is made, from the top down:

* An **alphabet** has a style: a small library of stroke primitives (lines, arcs, hooks, loops,
  corners, zigzags, waves) with their own proportions, a curliness, a typical stroke count, a stroke
  size, a set of allowed orientations and a habit of joining strokes together.
* A **character** is 1-4 strokes of its alphabet's primitives, each rotated, mirrored and scaled,
  placed on a 3x3 grid or joined to an earlier stroke. Characters of one alphabet that come out too
  alike are drawn again, so every character can be told apart from its neighbours.
* Each character is drawn by several **drawers**. A drawer has a hand of their own (slant, pen width,
  sloppiness) and every drawing adds its own wobble: jittered control points, strokes moved, turned
  and shortened, pen width varied, and a random affine transform of the whole glyph.

A stroke is a Catmull-Rom spline through a few guide points. Rendering samples every stroke densely
and splats each sample into the pixels around it with an antialiased disc (max, not sum, so
crossings do not glow), all strokes of all images at once. The default set, 40 alphabets x 30
characters x 20 drawers = 24,000 images of 28x28 (18 MB as uint8), takes about 3 s of CPU time.

Difficulty, measured on the default set with ``python -m metaphi.tasks.glyphs`` (which prints these):
a nearest-neighbour classifier on raw pixels gets 57.7 % on 5-way 1-shot episodes of the test
alphabets, 57.0 % when all five characters come from one alphabet (2000 episodes each). So the data
is far from trivial, while the characters are easy to tell apart by eye.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import time

import torch
from torch import Tensor

from metaphi.tasks.base import DataError, ImageClasses
from metaphi.tasks.episodes import EpisodeSampler

# Bump whenever a change to the generator changes the images, so old caches are not reused.
FORMAT_VERSION = 1

GUIDES = 7          # guide points per stroke
SAMPLES = 16        # spline samples per span between guide points: under a pixel apart at 28 px
MAX_STROKES = 4
KINDS = ("line", "arc", "hook", "loop", "corner", "zigzag", "wave")


def _uniform(g: torch.Generator, low: float, high: float, *shape: int) -> Tensor:
    return torch.rand(shape or (), generator=g) * (high - low) + low


def _normal(g: torch.Generator, std: float | Tensor, *shape: int) -> Tensor:
    return torch.randn(shape or (), generator=g) * std


def _wobble(g: torch.Generator, bend: float | Tensor, rough: float | Tensor, *shape: int) -> Tensor:
    """Offsets [*shape, GUIDES, 2] for guide points: a smooth random bend plus a little roughness.

    Independent noise on every guide would make strokes wiggle like worms; a hand's errors are mostly
    smooth along a stroke, so most of the offset is a random multiple of one half-sine bump.
    """
    bump = torch.sin(math.pi * torch.linspace(0, 1, GUIDES)).view(GUIDES, 1)
    return _normal(g, bend, *shape, 1, 2) * bump + _normal(g, rough, *shape, GUIDES, 2)


def _rotation(angle: Tensor) -> Tensor:
    """Rotation matrices [..., 2, 2] for angles [...] in radians (row vectors multiply from the left)."""
    c, s = torch.cos(angle), torch.sin(angle)
    return torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2)


def _polyline(corners: list[tuple[float, float]], fractions: list[float]) -> Tensor:
    """Guide points at the given arc-length fractions along a polyline through ``corners``."""
    corners_t = torch.tensor(corners)
    lengths = (corners_t[1:] - corners_t[:-1]).norm(dim=1)
    cum = torch.cat([torch.zeros(1), lengths.cumsum(0)]) / lengths.sum()
    points = []
    for f in fractions:
        i = min(int(torch.searchsorted(cum, torch.tensor(f), right=True)) - 1, len(lengths) - 1)
        t = (f - cum[i]) / (cum[i + 1] - cum[i])
        points.append(corners_t[i] + t * (corners_t[i + 1] - corners_t[i]))
    return torch.stack(points)


def _primitive(kind: str, curl: float, g: torch.Generator) -> Tensor:
    """One stroke shape of an alphabet: GUIDES guide points, centred, largest side 1."""
    s = torch.linspace(0, 1, GUIDES)
    if kind == "line":
        bend = curl * float(_uniform(g, -0.25, 0.25))
        pts = torch.stack([s - 0.5, bend * 4 * s * (1 - s)], 1)
    elif kind == "arc":
        span = min(curl * float(_uniform(g, 0.5, 1.2)), 1.7) * math.pi
        a = span * (s - 0.5)
        pts = torch.stack([torch.cos(a), torch.sin(a)], 1)
    elif kind == "hook":
        # A straight shaft that curls over at one end, like a J or a shepherd's crook.
        turn = min(curl * float(_uniform(g, 0.7, 1.2)), 1.5) * math.pi
        radius = float(_uniform(g, 0.15, 0.3))
        shaft = torch.stack([torch.linspace(-1, 0, 4), torch.zeros(4)], 1)
        a = torch.linspace(0, turn, 4)[1:]
        curl_pts = torch.stack([radius * torch.sin(a), radius * (1 - torch.cos(a))], 1)
        pts = torch.cat([shaft, curl_pts])
    elif kind == "loop":
        # A stroke that comes in, goes once round a loop and leaves, crossing itself.
        r = float(_uniform(g, 0.3, 0.5))
        lean = float(_uniform(g, -0.3, 0.3))
        a = torch.linspace(-0.5, 1.5, GUIDES - 2) * math.pi
        ring = torch.stack([r * torch.cos(a) + lean * (1 + torch.sin(a)), r * (1 + torch.sin(a))], 1)
        pts = torch.cat([torch.tensor([[-0.8, -0.1]]), ring, torch.tensor([[0.8, -0.1]])])
    elif kind == "corner":
        # Two straight arms meeting at a sharp vertex; guides crowd the vertex to keep it sharp.
        angle = float(_uniform(g, 0.25, 0.75)) * math.pi
        arm = float(_uniform(g, 0.5, 1.0))
        pts = _polyline([(-1.0, 0.0), (0.0, 0.0), (arm * math.cos(angle), arm * math.sin(angle))],
                        [0, 0.3, 0.46, 0.5, 0.54, 0.7, 1.0])
    elif kind == "zigzag":
        h = float(_uniform(g, 0.4, 1.0))
        w = float(_uniform(g, -0.3, 0.3))
        pts = _polyline([(0, 0), (1, 0), (w, -h), (1 + w, -h)], [0, 0.2, 0.33, 0.5, 0.67, 0.8, 1.0])
    elif kind == "wave":
        amp = curl * float(_uniform(g, 0.12, 0.25))
        periods = float(_uniform(g, 0.8, 1.3))
        pts = torch.stack([s - 0.5, amp * torch.sin(2 * math.pi * periods * s)], 1)
    else:
        raise ValueError(kind)
    return _normalised(pts)


def _normalised(pts: Tensor, extent: float = 1.0) -> Tensor:
    """Centre the bounding box of pts [..., 2] (over all but the last dim) and scale its larger side."""
    flat = pts.reshape(-1, 2)
    lo, hi = flat.amin(0), flat.amax(0)  # not min(0): with indices it starts worker threads
    return (pts - (lo + hi) / 2) * (extent / (hi - lo).max().clamp_min(1e-6))


def _alphabet_style(g: torch.Generator) -> dict:
    curl = float(_uniform(g, 0.6, 1.4))
    # Flat Dirichlet weights (normalised exponentials): torch's Dirichlet takes no generator.
    gammas = -torch.log(torch.rand(len(KINDS), generator=g).clamp_min(1e-12))
    kind_weights = gammas / gammas.sum()
    n_primitives = int(torch.randint(4, 8, (), generator=g))
    kinds = torch.multinomial(kind_weights, n_primitives, replacement=True, generator=g)
    return {
        "primitives": [_primitive(KINDS[k], curl, g) for k in kinds.tolist()],
        "mean_strokes": float(_uniform(g, 1.6, 3.2)),
        "stroke_size": float(_uniform(g, 0.7, 1.3)),   # relative to the grid spacing
        # Some alphabets turn their strokes only by right angles, others also by diagonals.
        "rotation_step": math.pi / (2 if bool(torch.rand((), generator=g) < 0.5) else 4),
        "p_join": float(_uniform(g, 0.2, 0.8)),
    }


def _character(style: dict, g: torch.Generator) -> Tensor:
    """Guide points [strokes, GUIDES, 2] of one character, fitted into [-1, 1]."""
    n = int(round(float(style["mean_strokes"] + _normal(g, 0.8))))
    n = min(max(n, 1), MAX_STROKES)
    grid = torch.tensor([-0.6, 0.0, 0.6])
    cells = torch.randperm(9, generator=g)  # strokes placed apart take different cells
    strokes: list[Tensor] = []
    for i in range(n):
        prims = style["primitives"]
        pts = prims[int(torch.randint(len(prims), (), generator=g))]
        pts = pts + _wobble(g, 0.15, 0.02)  # characters sharing a primitive still differ
        if bool(torch.rand((), generator=g) < 0.5):
            pts = pts * torch.tensor([-1.0, 1.0])
        steps = round(2 * math.pi / style["rotation_step"])
        angle = style["rotation_step"] * torch.randint(steps, (), generator=g) + _normal(g, 0.1)
        pts = pts @ _rotation(angle) * style["stroke_size"] * float(_uniform(g, 0.7, 1.3))
        if strokes and bool(torch.rand((), generator=g) < style["p_join"]):
            # Start or end this stroke on an end or the middle of an earlier one, as pens do.
            other = strokes[int(torch.randint(len(strokes), (), generator=g))]
            at = other[[0, GUIDES // 2, GUIDES - 1][int(torch.randint(3, (), generator=g))]]
            own = pts[[0, GUIDES - 1][int(torch.randint(2, (), generator=g))]]
            pts = pts - own + at
        else:
            cell = torch.stack([grid[cells[i] % 3], grid[cells[i] // 3]]) + _normal(g, 0.05, 2)
            pts = pts - pts.mean(0) + cell
        strokes.append(pts)
    return _normalised(torch.stack(strokes), extent=2.0)


def _spline_weights() -> Tensor:
    """W [points, GUIDES]: curve samples of a Catmull-Rom spline through the guides = W @ guides.

    The ends use phantom guides mirrored through the first and last guide (P[-1] = 2 P[0] - P[1]),
    folded into W, so the curve starts and ends exactly on its end guides.
    """
    t = torch.arange(SAMPLES, dtype=torch.float64) / SAMPLES
    basis = 0.5 * torch.stack([-t**3 + 2 * t**2 - t, 3 * t**3 - 5 * t**2 + 2, -3 * t**3 + 4 * t**2 + t, t**3 - t**2], 1)
    spans = GUIDES - 1
    w = torch.zeros(spans * SAMPLES + 1, GUIDES + 2, dtype=torch.float64)  # columns: P[-1], P[0..], P[K]
    for i in range(spans):
        w[i * SAMPLES : (i + 1) * SAMPLES, i : i + 4] = basis
    w[-1, GUIDES] = 1.0
    w[:, 1] += 2 * w[:, 0]
    w[:, 2] -= w[:, 0]
    w[:, GUIDES] += 2 * w[:, GUIDES + 1]
    w[:, GUIDES - 1] -= w[:, GUIDES + 1]
    return w[:, 1 : GUIDES + 1].float()


def _resembles(outline: Tensor, outlines: Tensor, tolerance: float) -> bool:
    """Whether point set outline [M, 2] is close to one of outlines [n, M, 2]: the root mean square
    closest-point distance, averaged over both directions, is under ``tolerance``.

    Worked a few outlines at a time, without sqrt and min-with-indices: such tiny ops then stay on one
    thread, where a parallel op inside this Python loop would leave worker threads spinning against it
    and make it many times slower on a busy machine.
    """
    for part in outlines.split(4):
        d2 = (part.unsqueeze(2) - outline.view(1, 1, -1, 2)).square().sum(-1)  # [k, M, M] squared
        if bool(((d2.amin(2).mean(1) + d2.amin(1).mean(1)) / 2 < tolerance**2).any()):
            return True
    return False


def _alphabet(characters: int, g: torch.Generator, curve: Tensor) -> list[Tensor]:
    """The characters of one alphabet, each clearly different in shape from all the others."""
    style = _alphabet_style(g)
    chars: list[Tensor] = []
    sparse = curve[::8]
    outlines = torch.zeros(0, MAX_STROKES * len(sparse), 2)
    for _ in range(characters):
        for attempt in range(50):
            char = _character(style, g)
            # Pad to MAX_STROKES by repeating strokes: the same set of points, so the same distance.
            outline = (sparse @ char[torch.arange(MAX_STROKES) % len(char)]).reshape(-1, 2)
            # Within about 1.4 px of an existing character: too easy to confuse, redraw
            # (an alphabet whose style cannot make enough different characters keeps the last try).
            if not _resembles(outline, outlines, 0.15) or attempt == 49:
                break
        chars.append(char)
        outlines = torch.cat([outlines, outline.unsqueeze(0)])
    return chars


def _drawings(guides: Tensor, hands: dict, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Jittered guides [B, S, GUIDES, 2] in [-1, 1] units and pen half-widths [B, S] in pixels."""
    b, s = guides.shape[:2]
    sloppy = hands["sloppiness"].view(b, 1, 1, 1)
    # Every stroke wobbles, shifts, turns and resizes a little about its own centre.
    guides = guides + _wobble(g, 0.1, 0.025, b, s) * sloppy
    centre = guides.mean(2, keepdim=True)
    turn = _rotation(_normal(g, 0.12, b, s) * sloppy.view(b, 1))
    size = (1 + _normal(g, 0.1, b, s) * sloppy.view(b, 1)).view(b, s, 1, 1)
    guides = (guides - centre) @ turn * size + centre + _normal(g, 0.08, b, s, 1, 2) * sloppy
    # Pens start late and lift early: pull the end guides towards their neighbours.
    start = _uniform(g, 0.0, 0.4, b, s, 1)
    end = _uniform(g, 0.0, 0.4, b, s, 1)
    guides = guides.clone()
    guides[:, :, 0] = guides[:, :, 0] + start * (guides[:, :, 1] - guides[:, :, 0])
    guides[:, :, -1] = guides[:, :, -1] + end * (guides[:, :, -2] - guides[:, :, -1])
    # The whole glyph: the drawer's slant plus a random rotation, scale, shear and shift.
    angle = _normal(g, 0.12, b)
    scale = _uniform(g, 0.8, 1.05, b, 1) * (1 + _normal(g, 0.06, b, 2))
    shear = hands["slant"] + _normal(g, 0.1, b)
    affine = _rotation(angle) @ torch.stack(
        [torch.stack([scale[:, 0], torch.zeros(b)], -1), torch.stack([shear * scale[:, 1], scale[:, 1]], -1)], -2)
    shift = _normal(g, 0.1, b, 2)
    guides = guides.reshape(b, s * GUIDES, 2) @ affine + shift.view(b, 1, 2)
    half_width = hands["half_width"].view(b, 1) * _uniform(g, 0.85, 1.15, b, s)
    return guides.view(b, s, GUIDES, 2), half_width


def _render(points: Tensor, image: Tensor, half_width: Tensor, count: int, size: int) -> Tensor:
    """Antialiased ink uint8 [count, size, size] from curve samples.

    points [P, 2] in pixel coordinates (x, y), image [P] the image each sample belongs to, half_width [P].
    Each sample lights the pixels around it by how far their centre lies inside a disc of its pen
    width (a one-pixel ramp at the rim); a pixel keeps the brightest value, which for dense samples is
    the antialiased distance to the curve.
    """
    # A pixel centre c gets ink only if |c - p| < reach, so the window floor(p) + (1 - reach .. reach) does.
    reach = math.ceil(float(half_width.max()) + 0.5)
    offsets = torch.arange(1.0 - reach, reach + 1.0)
    # Draw on a canvas with a border, cropped at the end, so no sample needs a bounds check; samples
    # far outside are clamped into the border, where their window cannot reach the visible pixels.
    border = 2 * reach + 1
    side = size + 2 * border
    points = (points + border).clamp(reach - 1.0, side - 1.0 - reach)
    base = points.floor()
    dx = (base[:, 0:1] + offsets - points[:, 0:1]).square_()                     # [P, window]
    dy = (base[:, 1:2] + offsets - points[:, 1:2]).square_()
    dist = (dy.unsqueeze(2) + dx.unsqueeze(1)).sqrt_()                          # [P, rows, columns]
    ink = dist.neg_().add_(half_width.view(-1, 1, 1) + 0.5).clamp_(0, 1)
    start = (image * side + base[:, 1].long()) * side + base[:, 0].long()
    step = offsets.long()
    window = (step.view(-1, 1) * side + step.view(1, -1)).flatten()
    canvas = torch.zeros(count * side * side)
    canvas.scatter_reduce_(0, (start.unsqueeze(1) + window).flatten(), ink.flatten(), reduce="amax")
    canvas = canvas.view(count, side, side)[:, border : border + size, border : border + size]
    return canvas.mul(255).round_().to(torch.uint8)


def generate_glyphs(alphabets: int = 40, characters: int = 30, drawers: int = 20, size: int = 28,
                    seed: int = 0, progress: bool = False) -> ImageClasses:
    """Generate the glyphs data set: ``alphabets * characters`` classes of ``drawers`` images each.

    Images are uint8 [N, 1, size, size], ink 255 on paper 0, ordered class by class; classes are named
    ``alphabetAA/charCC`` and ``groups`` holds each class's alphabet. The same arguments always give
    bit-identical images: all randomness comes from one torch.Generator seeded with ``seed``.
    """
    if min(alphabets, characters, drawers) < 1 or size < 8:
        raise DataError(f"glyphs needs at least one alphabet, character and drawer and size >= 8, got "
                        f"{alphabets=}, {characters=}, {drawers=}, {size=}")
    g = torch.Generator().manual_seed(seed)
    curve = _spline_weights()
    width = max(2, len(str(alphabets - 1)))
    cwidth = max(2, len(str(characters - 1)))
    guides = torch.zeros(alphabets * characters, MAX_STROKES, GUIDES, 2)
    mask = torch.zeros(alphabets * characters, MAX_STROKES, dtype=torch.bool)
    classes, groups = [], []
    hands = {"slant": [], "sloppiness": [], "half_width": []}
    alphabet_ids = range(alphabets)
    if progress:
        from tqdm import tqdm
        alphabet_ids = tqdm(alphabet_ids, desc="glyphs: alphabets")
    for a in alphabet_ids:
        name = f"alphabet{a:0{width}d}"
        for c, char in enumerate(_alphabet(characters, g, curve)):
            i = a * characters + c
            guides[i, : len(char)] = char
            mask[i, : len(char)] = True
            classes.append(f"{name}/char{c:0{cwidth}d}")
            groups.append(name)
        # Each drawer keeps one hand across the alphabet, as each Omniglot drawer did.
        hands["slant"].append(_normal(g, 0.15, drawers).repeat(characters))
        hands["sloppiness"].append(_uniform(g, 0.6, 1.4, drawers).repeat(characters))
        hands["half_width"].append(_uniform(g, 0.6, 1.2, drawers).repeat(characters))
    n = alphabets * characters * drawers
    jittered, half_width = _drawings(guides.repeat_interleave(drawers, 0), {k: torch.cat(v) for k, v in hands.items()}, g)
    keep = mask.repeat_interleave(drawers, 0)
    points = curve @ jittered                                                    # [N, S, points, 2]
    # Writers stay on the paper: shrink the few drawings that the jitter pushed out of [-1.15, 1.15],
    # which maps onto the canvas with a margin of two pixels and a pen's width.
    reach = (points.abs().amax((2, 3)) * keep).amax(1)
    points = points * (1.15 / reach.clamp_min(1.15)).view(n, 1, 1, 1)
    points = points * (0.34 * size) + (size - 1) / 2
    image = torch.arange(n).view(n, 1, 1).expand(n, MAX_STROKES, curve.shape[0])[keep].flatten()
    hw = half_width.unsqueeze(-1).expand(n, MAX_STROKES, curve.shape[0])[keep].flatten() * (size / 28)
    points = points[keep].reshape(-1, 2)
    # Render in slices of whole images, to bound memory; samples are in image order already.
    images = torch.empty(n, size, size, dtype=torch.uint8)
    chunk = 1000
    starts = range(0, n, chunk)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="glyphs: rendering")
    for lo in starts:
        count = min(chunk, n - lo)
        a, b = torch.searchsorted(image, torch.tensor([lo, lo + count])).tolist()
        images[lo : lo + count] = _render(points[a:b], image[a:b] - lo, hw[a:b], count, size)
    targets = torch.arange(alphabets * characters).repeat_interleave(drawers)
    return ImageClasses(images.unsqueeze(1), targets, classes, groups)


_GENERATE_SIGNATURE = inspect.signature(generate_glyphs)


def _generation_args(generate_kwargs: dict) -> dict:
    """All arguments that decide the images, defaults filled in, so equal sets hash equally."""
    bound = _GENERATE_SIGNATURE.bind(**generate_kwargs)
    bound.apply_defaults()
    args = dict(bound.arguments)
    args.pop("progress")
    return args


def load_glyphs(cache_dir: str | os.PathLike | None = None, **generate_kwargs) -> ImageClasses:
    """The glyphs set for these generation arguments, generated once and cached.

    The cache lives in ``cache_dir``, else ``$METAPHI_CACHE``, else ``~/.cache/metaphi``, in a file
    whose name holds the format version and a hash of the arguments that change the images.
    """
    args = _generation_args(generate_kwargs)
    if cache_dir is None:
        cache_dir = os.environ.get("METAPHI_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "metaphi")
    key = hashlib.sha256(json.dumps({**args, "version": FORMAT_VERSION}, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(os.fspath(cache_dir), f"glyphs-v{FORMAT_VERSION}-{key}.pt")
    if os.path.exists(path):
        try:
            return ImageClasses.load(path)
        except Exception as e:  # a cache is only a cache, but never silently replace a file we cannot read
            raise DataError(f"cannot read the glyphs cache {path} ({e}); delete it and it will be regenerated") from e
    data = generate_glyphs(**args, progress=generate_kwargs.get("progress", False))
    data.save(path)
    return data


def glyph_splits(data: ImageClasses, seed: int = 0) -> dict[str, ImageClasses]:
    """Split by alphabet into "train", "val" and "test" (about 70/10/20 % of the alphabets).

    Whole alphabets go to one split, so test characters come from styles never seen in training.
    """
    if data.groups is None:
        raise DataError("glyph_splits needs the alphabet of each class (groups); use generate_glyphs or load_glyphs")
    names = sorted(set(data.groups))
    if len(names) < 3:
        raise DataError(f"splitting by alphabet needs at least 3 alphabets, got {len(names)}")
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(0.1 * len(names)))
    n_test = max(1, round(0.2 * len(names)))
    n_train = len(names) - n_val - n_test
    parts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    splits = {}
    for split, picks in parts.items():
        chosen = {names[i] for i in picks}
        splits[split] = data.subset([c for c, grp in enumerate(data.groups) if grp in chosen])
    return splits


def pixel_nn_accuracy(data: ImageClasses, ways: int = 5, shots: int = 1, query: int = 5, episodes: int = 500,
                      within_group: bool = False, seed: int = 0) -> float:
    """Accuracy of a nearest-neighbour classifier on raw pixels over N-way K-shot episodes.

    The weakest sensible few-shot learner, used as a difficulty gauge for a data set.
    """
    sampler = EpisodeSampler(data, ways, shots, query, within_group=within_group, name="glyphs")
    g = torch.Generator().manual_seed(seed)
    correct = total = 0
    for _ in range(episodes):
        (xs, ys), (xq, yq) = sampler.sample(g)
        nearest = torch.cdist(xq.flatten(1), xs.flatten(1)).argmin(1)
        correct += int((ys[nearest] == yq).sum())
        total += len(yq)
    return correct / total


if __name__ == "__main__":
    wall, cpu = time.perf_counter(), time.process_time()
    glyphs = generate_glyphs()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"generated {glyphs.num_classes} classes, {len(glyphs.targets)} images in {wall:.1f} s "
          f"({cpu:.1f} s CPU, {torch.get_num_threads()} threads), {glyphs.images.numel() / 2**20:.1f} MiB of uint8")
    test = glyph_splits(glyphs)["test"]
    for within in (False, True):
        acc = pixel_nn_accuracy(test, episodes=2000, within_group=within)
        print(f"pixel nearest neighbour, 5-way 1-shot, test alphabets{', within alphabet' if within else ''}: "
              f"{100 * acc:.1f} %")
