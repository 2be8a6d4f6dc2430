"""What every study shares: the resumable sweep over its cells, the result files (JSON written
atomically, a markdown table), the machine they ran on, and seeds -> t-interval tables."""
from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from typing import Any, Callable, Hashable, Sequence


def resumed_rows(checkpoint: str | None, identity: Any, *, stored_as: str = "config",
                 other: str = "a different configuration") -> list[dict]:
    """The rows a sweep's ``checkpoint`` holds (none without one). A checkpoint whose ``stored_as`` entry
    is not ``identity`` (what its rows are a function of) is refused with a ValueError: "CHECKPOINT
    holds ``other``; use another --out or delete it"."""
    from metaphi import checkpoint as ckpt

    if not checkpoint or not os.path.exists(checkpoint):
        return []
    saved = ckpt.load(checkpoint)
    if not isinstance(saved, dict) or saved.get(stored_as) != identity:
        raise ValueError(f"{checkpoint} holds {other}; use another --out or delete it")
    return list(saved["rows"])


def sweep(plan: Sequence[Hashable], run_cell: Callable[[Any], dict], *, key: Callable[[dict], Hashable],
          checkpoint: str | None = None, identity: Any = None, desc: str = "", progress: bool = False, log=print,
          postfix: Callable[[dict], dict] | None = None, stored_as: str = "config",
          other: str = "a different configuration") -> list[dict]:
    """Every cell of ``plan`` (e.g. (seed, method)) run once by ``run_cell(cell) -> row``; the rows.

    With ``checkpoint`` the rows are saved there after each cell (``{stored_as: identity, "rows":
    rows}``, plain data), and a rerun keeps the rows it holds (:func:`resumed_rows`: only with the same
    ``identity``) and skips their cells: ``key(row)`` is the cell a row is of. Rows come in the order
    they were run, the resumed ones first. ``progress``: a bar over the plan (``desc``; after each
    cell its ``postfix(row)``)."""
    from metaphi import checkpoint as ckpt

    rows = resumed_rows(checkpoint, identity, stored_as=stored_as, other=other)
    if rows:
        log(f"resuming: {len(rows)} runs done")
    done = {key(r) for r in rows}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(plan), initial=sum(1 for cell in plan if cell in done), desc=desc)
    for cell in plan:
        if cell in done:
            continue
        row = run_cell(cell)
        rows.append(row)
        if checkpoint:
            ckpt.save({stored_as: identity, "rows": rows}, checkpoint)
        if bar is not None:
            bar.update(1)
            if postfix is not None:
                bar.set_postfix(**postfix(row))
    if bar is not None:
        bar.close()
    return rows


def write_result(result: dict, out: str, table: str, quiet: bool, also: str = "") -> None:
    """``out``/result.json (with the machine) and ``out``/result.md (``table``); the table is printed unless
    ``quiet``, with the files written (``also`` names the others)."""
    result["machine"] = machine()
    write_json(result, os.path.join(out, "result.json"))
    with open(os.path.join(out, "result.md"), "w") as f:
        f.write(table + "\n")
    if not quiet:
        print(table)
        print(f"wrote {os.path.join(out, 'result.json')}, result.md{also}")


def strict(obj):
    """``obj`` with every NaN or infinite float (Python or numpy scalar) replaced by None, inside dicts,
    lists and tuples: what strict JSON can hold."""
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(obj, path: str) -> None:
    """``obj`` as strict JSON at ``path`` (NaN and infinities written as null), atomically: a reader
    sees the old file or the whole new one, and no temporary file is left behind on failure."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(strict(obj), f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def machine() -> str:
    import torch
    return (f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s)")


def save_config(config, out: str, command: str) -> str:
    """The fully resolved ``config`` of ``metaphi COMMAND`` as ``out``/config.yaml; ``metaphi COMMAND
    --config`` that file (with another ``--out``) runs the same study again."""
    from metaphi.config import save_yaml

    path = os.path.join(out, "config.yaml")
    save_yaml(config, path, header=f"the fully resolved configuration of this run; rerun it with\n"
                                   f"metaphi {command} --config {path} --out NEW_FOLDER")
    return path


def over_seeds(rows: list[dict], by: tuple[str, ...] | list[str], values: tuple[str, ...] | list[str],
               order: list | None = None) -> list[dict]:
    """Rows grouped by the keys ``by`` (e.g. method, setting); for each of ``values`` the mean and 95%
    Student-t interval over the group's rows (its seeds): ``{**group keys, "seeds": n, V: mean, V_ci: ci}``.
    Groups come in first-seen order, or sorted by ``order`` (a list of values of the first key)."""
    from metaphi.evaluate import mean_ci95

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    keys = list(groups)
    if order is not None:
        keys.sort(key=lambda k: order.index(k[0]) if k[0] in order else len(order))
    out = []
    for key in keys:
        rs = groups[key]
        entry = {**dict(zip(by, key)), "seeds": len(rs)}
        for v in values:
            vals = [r[v] for r in rs if r.get(v) is not None]
            if vals:
                entry[v], entry[f"{v}_ci"] = mean_ci95(vals)
        out.append(entry)
    return out


def paired_difference(rows: list[dict], value: str, method: str, reference: str, key: str = "method",
                      pair: str = "seed") -> tuple[float, float, int] | None:
    """Mean and 95% t-interval of ``value`` of ``method`` minus ``reference`` over the ``pair`` values
    (seeds) both have, and their number; None when they share none."""
    from metaphi.evaluate import mean_ci95

    a = {r[pair]: r[value] for r in rows if r[key] == method}
    b = {r[pair]: r[value] for r in rows if r[key] == reference}
    common = [s for s in a if s in b]
    if not common:
        return None
    mean, ci = mean_ci95([a[s] - b[s] for s in common])
    return mean, ci, len(common)


def pm(mean: float | None, ci: float | None, scale: float = 100.0, digits: int = 2, signed: bool = False) -> str:
    """``mean ± ci`` for a table cell (scaled, e.g. to percent); a dash for a missing value."""
    if mean is None:
        return "–"
    sign = "+" if signed else ""
    if ci is None:
        return f"{mean * scale:{sign}.{digits}f}"
    return f"{mean * scale:{sign}.{digits}f} ± {ci * scale:.{digits}f}"


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A markdown table; the first column left-aligned, the rest right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
