"""Episodes per second drawn by EpisodeSampler from a decoded cache.

    .venv/bin/python benchmarks/episode_speed.py [--data-root ../shared/data/omniglot] [--quick]

Stores: the Omniglot minimal set small1 read back from its decoded cache (synthetic 28x28 data of
the same shape when the archive is absent), a store the size of MAML's Omniglot training set
(4400 classes x 20, synthetic) and one the size of mini-ImageNet's (64 classes x 600, 3x84x84,
synthetic; contents do not change the speed). Each N-way K-shot setting is timed in repeats, with
torch's default intra-op threads and with one thread, and the median is reported.

Writes benchmarks/results/episode_speed.json with the machine, the load average and the medians.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metaphi.tasks import EpisodeSampler, ImageClasses  # noqa: E402
from metaphi.tasks import omniglot  # noqa: E402

HERE = Path(__file__).resolve().parent
SETTINGS = [(5, 1, 15), (5, 5, 15), (20, 1, 5), (20, 5, 5)]  # ways, shots, query per class


def check(sampler: EpisodeSampler, generator: torch.Generator) -> None:
    """A task has the right shapes, distinct images, and each label names one class."""
    task = sampler.sample(generator)
    (xs, ys), (xq, yq) = task
    ways, shots, query = sampler.ways, sampler.shots, sampler.query
    assert xs.shape[0] == ways * shots and xq.shape[0] == ways * query
    assert ys.tolist() == [c for c in range(ways) for _ in range(shots)]
    assert yq.tolist() == [c for c in range(ways) for _ in range(query)]
    assert 0.0 <= float(xs.min()) and float(xs.max()) <= 1.0


def omniglot_store(data_root: Path, cache_dir: Path) -> tuple[str, ImageClasses, dict]:
    if (data_root / "images_background_small1.zip").exists():
        t = time.perf_counter()
        omniglot.read(data_root, "small1", cache_dir=False)
        decode = time.perf_counter() - t
        omniglot.read(data_root, "small1", cache_dir=cache_dir)  # writes the cache if it is missing
        t = time.perf_counter()
        data = omniglot.read(data_root, "small1", cache_dir=cache_dir)
        return "omniglot small1 (decoded cache)", data, {"decode_s": round(decode, 3),
                                                          "cached_read_s": round(time.perf_counter() - t, 3)}
    g = torch.Generator().manual_seed(0)
    data = synthetic(136, 20, (1, 28, 28), g)
    path = cache_dir / "synthetic-omniglot.pt"
    data.save(path)
    return "synthetic 136 x 20 of 1x28x28 (archive absent)", ImageClasses.load(path), {}


def synthetic(classes: int, per_class: int, shape: tuple[int, ...], g: torch.Generator) -> ImageClasses:
    images = torch.randint(0, 256, (classes * per_class, *shape), dtype=torch.uint8, generator=g)
    return ImageClasses(images, torch.arange(classes).repeat_interleave(per_class), [str(c) for c in range(classes)])


def rate(sampler: EpisodeSampler, episodes: int, g: torch.Generator) -> tuple[float, float]:
    """Episodes per wall-clock second and per CPU second of this process (with one thread, the
    latter is what an idle machine would give when other jobs share the cores)."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(episodes):
        sampler.sample(g)
    return episodes / (time.perf_counter() - wall), episodes / max(time.process_time() - cpu, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=HERE.parents[1] / "shared" / "data" / "omniglot")
    parser.add_argument("--episodes", type=int, default=1000, help="episodes per timed repeat (at most)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer episodes and repeats, Omniglot only")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "episode_speed.json")
    args = parser.parse_args()
    if args.quick:
        args.episodes, args.repeats = 200, 3
    cache_dir = HERE / "results" / "tmp" / "cache"
    g = torch.Generator().manual_seed(0)
    name, data, read_times = omniglot_store(args.data_root, cache_dir)
    stores = [(name, data)]
    if not args.quick:
        stores.append(("synthetic MAML-Omniglot size: 4400 x 20 of 1x28x28", synthetic(4400, 20, (1, 28, 28), g)))
        stores.append(("synthetic mini-ImageNet size: 64 x 600 of 3x84x84", synthetic(64, 600, (3, 84, 84), g)))
    default_threads = torch.get_num_threads()
    load_before = os.getloadavg()
    results = []
    for store_name, store in stores:
        for ways, shots, query in SETTINGS:
            samplers = {"EpisodeSampler": EpisodeSampler(store, ways, shots, query)}
            for sampler in samplers.values():
                check(sampler, g)
            episodes = args.episodes if store.image_shape[0] == 1 else max(args.episodes // 5, 50)
            for threads in sorted({default_threads, 1}, reverse=True):
                torch.set_num_threads(threads)
                rates: dict[str, list[tuple[float, float]]] = {k: [] for k in samplers}
                counts = {}
                for k, sampler in samplers.items():  # warm up, and keep a repeat under about a second
                    counts[k] = int(min(episodes, max(20, rate(sampler, 20, g)[0])))
                for _ in range(args.repeats):
                    for k, sampler in samplers.items():
                        rates[k].append(rate(sampler, counts[k], g))
                for k, r in rates.items():
                    wall = statistics.median(x for x, _ in r)
                    cpu = statistics.median(y for _, y in r)
                    results.append({"data": store_name, "sampler": k, "ways": ways, "shots": shots, "query": query,
                                    "threads": threads, "episodes_per_repeat": counts[k],
                                    "episodes_per_s_median": round(wall, 1),
                                    "ms_per_episode_median": round(1000 / wall, 4),
                                    "episodes_per_cpu_s_median": round(cpu, 1),
                                    "episodes_per_s_repeats": [round(x, 1) for x, _ in r]})
                    print(f"{store_name[:30]:30s} {k:24s} {ways:2d}-way {shots}-shot q{query:<2d} "
                          f"threads={threads}: {wall:9.1f} episodes/s, {cpu:9.1f} per CPU second")
            torch.set_num_threads(default_threads)
    report = {
        "command": "python benchmarks/episode_speed.py" + (" --quick" if args.quick else ""),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {"platform": platform.platform(), "processor": _cpu_name(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "default_threads": default_threads,
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "repeats": args.repeats, "target_episodes_per_s": 5000,
        "omniglot_read_times": read_times, "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
