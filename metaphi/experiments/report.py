"""What every study writes: result files (JSON written atomically, a markdown table) and the machine
they ran on."""
from __future__ import annotations

import json
import os
import platform
import tempfile


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


def write_json(obj, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def machine() -> str:
    import torch
    return (f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s)")


def save_config(config, out: str) -> str:
    """The fully resolved ``config`` as ``out``/config.yaml; ``metaphi COMMAND --config`` that file (with
    another ``--out``) runs the same study again."""
    from metaphi.config import save_yaml

    path = os.path.join(out, "config.yaml")
    save_yaml(config, path, header="metaphi: the fully resolved configuration of this run; rerun it with\n"
                                    "metaphi COMMAND --config config.yaml --out NEW_FOLDER")
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
