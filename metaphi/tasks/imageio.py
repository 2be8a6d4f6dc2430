"""Shared helpers of the data readers: decoding with PIL, decoded caches, class splits.

Every reader turns its source (an archive, a pickle, a folder) into an :class:`ImageClasses` store of
uint8 images. Decoding is done once: :func:`cached` keeps the decoded store in a cache file keyed by
the size and modification time of the sources and by the decoding parameters, written atomically.

Cache files live in ``cache_dir``; when it is ``None`` that is :func:`default_cache_dir`
(``$METAPHI_CACHE``, else ``~/.cache/metaphi``), so a read-only data folder is never written to.
``cache_dir=False`` turns caching off.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import torch

from metaphi.tasks.base import DataError, ImageClasses, atomic_save

CACHE_VERSION = 1
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

Size = Union[int, Sequence[int]]
CacheDir = Union[str, os.PathLike, None, bool]


def _pil():
    from PIL import Image  # lazy: `import metaphi` must stay fast

    return Image


def _reason(e: Exception) -> str:
    """An exception as one line, for DataError messages."""
    return " ".join(f"{type(e).__name__}: {e}".split())


def as_size(size: Size | None) -> tuple[int, int] | None:
    """``28`` or ``(H, W)`` as ``(H, W)``; ``None`` stays ``None`` (keep each image's own size)."""
    if size is None:
        return None
    if isinstance(size, int):
        size = (size, size)
    h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {tuple(size)}")
    return h, w


def mode_of(channels: int) -> str:
    """PIL mode for a channel count: 1 -> "L", 3 -> "RGB"."""
    if channels == 1:
        return "L"
    if channels == 3:
        return "RGB"
    raise ValueError(f"images must have 1 or 3 channels, got {channels}")


def convert(img, mode: str):
    """Any PIL image in mode "L" or "RGB": transparency is composited on white, palettes expanded,
    16-bit and float greyscale scaled to 0..255."""
    if mode not in ("L", "RGB"):
        raise ValueError(f"mode must be 'L' or 'RGB', got {mode!r}")
    Image = _pil()
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if arr.size and arr.max() > 255:  # 16-bit samples
            arr = arr / 257.0
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        background.alpha_composite(rgba)
        img = background
    return img if img.mode == mode else img.convert(mode)


def decode(source: bytes | str | os.PathLike, name: str, mode: str, size: Size | None = None,
           invert: bool = False) -> np.ndarray:
    """Decode one image (encoded bytes, a uint8 numpy array of them, or a file path) to uint8 ``[C, H, W]``.

    ``mode`` is "L" (C = 1) or "RGB" (C = 3); ``size`` resizes with Lanczos antialiasing; ``invert``
    maps v to 255 - v (Omniglot's black ink becomes high). A file PIL cannot read raises
    :class:`DataError` naming ``name``.
    """
    Image = _pil()
    hw = as_size(size)
    try:
        encoded = isinstance(source, (bytes, bytearray, memoryview, np.ndarray))
        with Image.open(io.BytesIO(source) if encoded else source) as img:
            img.load()
            img = convert(img, mode)
            if hw is not None and (img.height, img.width) != hw:
                img = img.resize((hw[1], hw[0]), Image.LANCZOS)
            arr = np.asarray(img, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{name}: file not found; check the path") from None
    except Exception as e:  # PIL raises many types for bad files; all mean the same to the reader
        raise DataError(f"{name}: not a readable image ({_reason(e)}); replace or remove this file") from None
    if invert:
        arr = 255 - arr
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def decode_many(sources: Sequence, names: Sequence[str], mode: str, size: Size, invert: bool = False,
                workers: int | None = None) -> torch.Tensor:
    """Decode many images of one target size into a uint8 tensor ``[N, C, H, W]``.

    ``sources`` are encoded bytes or file paths; PIL releases the GIL while decoding and resizing,
    so a thread pool of ``workers`` (default: the CPU count) decodes them in parallel.
    """
    hw = as_size(size)
    channels = 1 if mode == "L" else 3
    out = np.empty((len(sources), channels, *hw), dtype=np.uint8)

    def one(i: int) -> None:
        out[i] = decode(sources[i], names[i], mode, hw, invert)

    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(sources) < 64:
        for i in range(len(sources)):
            one(i)
    else:
        with ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(one, range(len(sources)), chunksize=64):
                pass
    return torch.from_numpy(out)


@dataclass(frozen=True)
class Survey:
    """What a bounded sample of images looks like (:func:`survey`)."""

    #: images looked at, and how many there are
    sampled: int
    total: int
    #: every sampled image is grey: a greyscale mode (L, 1, LA, I;16, F), a grey palette, or colour
    #: channels equal to within :data:`GREY_TOLERANCE`
    greyscale: bool
    #: the median over the sampled images of each image's median grey level (0 black .. 255 white)
    median: float
    #: the longest side of any sampled image, in pixels
    largest: int


#: colour channels that differ by at most this much (of 255) are grey: JPEG keeps grey within a few levels
GREY_TOLERANCE = 8
#: images are looked at no larger than this (JPEG decodes at 1/2, 1/4 or 1/8 scale directly)
SURVEY_SIZE = 64


def survey(files: Sequence[str | os.PathLike], sample: int = 256, seed: int = 0) -> Survey:
    """Look at up to ``sample`` of ``files``, drawn with ``torch.Generator().manual_seed(seed)``
    (the same ones every time), each shrunk to :data:`SURVEY_SIZE` pixels: are they all grey, how
    light is their background. A file PIL cannot read raises :class:`DataError` naming it."""
    if not files:
        raise DataError("no images to look at")
    Image = _pil()
    pick = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:sample].sort().values
    grey, medians, largest = True, [], 0
    for i in pick.tolist():
        name = str(files[i])
        try:
            with Image.open(files[i]) as img:
                largest = max(largest, *img.size)
                img.draft(None, (SURVEY_SIZE, SURVEY_SIZE))  # JPEG: decode small; other formats ignore it
                img.load()
                rgb = convert(img, "RGB")
        except FileNotFoundError:
            raise DataError(f"{name}: file not found; check the path") from None
        except Exception as e:
            raise DataError(f"{name}: not a readable image ({_reason(e)}); replace or remove this file") from None
        rgb.thumbnail((SURVEY_SIZE, SURVEY_SIZE))
        arr = np.asarray(rgb, dtype=np.int16)
        if grey and int(np.abs(arr[..., :2] - arr[..., 1:]).max(initial=0)) > GREY_TOLERANCE:
            grey = False
        medians.append(float(np.median(np.asarray(rgb.convert("L")))))
    return Survey(sampled=len(medians), total=len(files), greyscale=grey, median=float(np.median(medians)),
                  largest=largest)


def list_images(folder: Path) -> list[Path]:
    """The files of ``folder`` (not hidden, not folders), sorted by name; non-images are kept so that
    decoding names them."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_file())


#: what a data pickle may name: numpy arrays, dtypes and scalars, and plain containers. Anything else
#: (``os.system``, ``builtins.eval``, a class of some module) is refused before it is called.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "bytearray"), ("builtins", "complex"),
    ("collections", "OrderedDict"),
}
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class UnsafePickle(pickle.UnpicklingError):
    """A pickle that names a callable outside :data:`_PICKLE_GLOBALS`: refused, never called."""


class _DataUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and plain containers and nothing else: data files can
    not run code however they were crafted."""

    def find_class(self, module: str, name: str):
        module = _PY2_MODULES.get(module, module)
        if (module, name) not in _PICKLE_GLOBALS:
            raise UnsafePickle(f"it asks for {module}.{name}, which a data file never needs; refused")
        if module.startswith("numpy.core."):  # numpy 1's name of what numpy 2 keeps in numpy._core
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def read_pickle(source: str | os.PathLike | bytes, name: str | None = None):
    """Unpickle a data file (or its bytes) written by Python 3 or by Python 2 (whose numpy arrays and
    strings need latin1). Only numpy arrays, dtypes, scalars and plain containers are rebuilt: a pickle
    that asks for anything else raises DataError before any of it is called, so no code in the file runs."""
    name = name or ("the pickle" if isinstance(source, bytes) else str(source))
    if not isinstance(source, bytes) and not Path(source).exists():
        raise DataError(f"{name}: not found")
    try:
        with (io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")) as f:
            try:
                return _DataUnpickler(f).load()
            except UnicodeDecodeError:
                f.seek(0)
                return _DataUnpickler(f, encoding="latin1").load()
    except UnsafePickle as e:
        raise DataError(f"{name}: not a data pickle ({e})") from None
    except Exception as e:
        raise DataError(f"{name}: not a readable pickle ({_reason(e)}); download it again") from None


def pickle_entry(d: dict, key: str, name: str):
    """``d[key]`` whether the pickle's keys came back as str or as bytes."""
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    raise DataError(f"{name}: no '{key}' entry (has {', '.join(map(str, d))}); is this the right file?")


def text(s) -> str:
    """A label name from a pickle, str or bytes."""
    return s.decode() if isinstance(s, bytes) else str(s)


# --------------------------------------------------------------------------------------------- caches
def default_cache_dir() -> Path:
    """``$METAPHI_CACHE``, else ``~/.cache/metaphi``: where decoded stores are cached."""
    return Path(os.environ.get("METAPHI_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "metaphi"))


def signature(path: str | os.PathLike) -> list:
    """What the cache is keyed by: a file's size and modification time; for a folder, a digest of the
    relative path, size and modification time of every file under it (hidden ones aside, as the
    readers skip them)."""
    path = Path(path)
    st = path.stat()
    if not path.is_dir():
        return [str(path.resolve()), st.st_size, st.st_mtime_ns]
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(f for f in files if not f.startswith(".")):
            p = os.path.join(folder, f)
            s = os.stat(p)
            digest.update(f"{os.path.relpath(p, path)}\0{s.st_size}\0{s.st_mtime_ns}\n".encode())
    return [str(path.resolve()), "dir", digest.hexdigest()]


def cache_file(cache_dir: CacheDir, stem: str, sources: Sequence[str | os.PathLike], params: dict) -> Path | None:
    """Where the decoded cache of ``sources`` lives: ``<cache_dir>/<stem>-<hash of paths and params>.pt``
    (``None`` when caching is off)."""
    if cache_dir is False:
        return None
    folder = default_cache_dir() if cache_dir is None or cache_dir is True else Path(cache_dir)
    ident = json.dumps([[str(Path(s).resolve()) for s in sources], params], sort_keys=True)
    return folder / f"{stem}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}.pt"


def cached(stem: str, sources: Sequence[str | os.PathLike], params: dict, build: Callable[[], ImageClasses],
           cache_dir: CacheDir = None) -> ImageClasses:
    """``build()`` once, then read its result back from the cache until a source or a parameter changes.

    The cache is written atomically after ``build`` succeeds, so a failure (a corrupt image) leaves
    no cache file. An unreadable or stale cache is rebuilt.
    """
    path = cache_file(cache_dir, stem, sources, params)
    if path is None:
        return build()
    key = {"version": CACHE_VERSION, "sources": [signature(s) for s in sources], "params": params}
    key = json.loads(json.dumps(key))  # plain lists, as they come back from the file
    if path.exists():
        try:
            state = torch.load(path, weights_only=True, mmap=True)
            if state.get("key") == key:
                return ImageClasses(state["images"], state["targets"], list(state["classes"]), state["groups"])
        except Exception:  # a cache we cannot read is rebuilt from the sources, which are the truth
            pass
    data = build()
    try:
        atomic_save({"key": key, **data.state()}, path)
    except OSError as e:
        raise DataError(f"cannot write the decoded cache {path} ({e}); set METAPHI_CACHE to a writable folder") from None
    return data


# ------------------------------------------------------------------------------------ class splits
def concat(parts: Sequence[ImageClasses]) -> ImageClasses:
    """One store holding the classes of all ``parts`` in order (class names must be distinct)."""
    names = [c for p in parts for c in p.classes]
    if len(set(names)) != len(names):
        dup = next(c for c in names if names.count(c) > 1)
        raise DataError(f"class '{dup}' appears in more than one of the stores joined")
    offsets = np.cumsum([0] + [p.num_classes for p in parts])
    groups = None
    if all(p.groups is not None for p in parts):
        groups = [g for p in parts for g in p.groups]
    return ImageClasses(
        images=torch.cat([p.images for p in parts]),
        targets=torch.cat([p.targets + int(o) for p, o in zip(parts, offsets)]),
        classes=names,
        groups=groups,
    )


def split_by_counts(data: ImageClasses, counts: Sequence[int], generator: torch.Generator) -> list[ImageClasses]:
    """Shuffle the classes with ``generator`` and cut them into consecutive parts of ``counts`` classes."""
    if sum(counts) > data.num_classes:
        raise DataError(f"a split of {list(counts)} classes needs {sum(counts)} classes but there are {data.num_classes}")
    order = torch.randperm(data.num_classes, generator=generator)
    parts, start = [], 0
    for n in counts:
        parts.append(data.subset(order[start:start + n]))
        start += n
    return parts


def split_by_groups(data: ImageClasses, held_out: int | Sequence[str], generator: torch.Generator,
                    what: str = "group") -> tuple[ImageClasses, ImageClasses]:
    """``(rest, held)``: the classes of the held-out groups (``held_out`` of them drawn with
    ``generator`` from the sorted group names, or the groups named) and of all other groups."""
    if data.groups is None:
        raise DataError(f"holding out whole {what}s needs class groups")
    names = sorted(set(data.groups))
    if isinstance(held_out, int):
        if not 0 <= held_out < len(names):
            raise DataError(f"cannot hold out {held_out} {what}s of {len(names)}; hold out fewer")
        held = {names[i] for i in torch.randperm(len(names), generator=generator)[:held_out].tolist()}
    else:
        held = set(held_out)
        unknown = sorted(held - set(names))
        if unknown:
            raise DataError(f"unknown {what} {unknown[0]!r} to hold out; known: {', '.join(names)}")
    rest = [c for c, g in enumerate(data.groups) if g not in held]
    kept = [c for c, g in enumerate(data.groups) if g in held]
    return data.subset(rest), data.subset(kept)
