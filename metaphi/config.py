"""Configuration is data: a dataclass per experiment and per algorithm family.

A config class is a plain dataclass whose fields are declared with :func:`option`, which records the
help text, the check its value must pass and how it appears on the command line. From that one
declaration come

* the command-line flags (:func:`add_options`): every flag's help shows its default, and nothing is
  filled in by argparse, so a flag the user did not give does not override a config file;
* the YAML file (:func:`load_yaml`, :func:`save_yaml`): a run writes its fully resolved config, and
  ``--config FILE`` reads one back, with flags on the command line taking precedence;
* the checks (:func:`check`): every number finite and in range, every choice valid, one line naming
  the option when not;
* the round trip (:func:`to_dict`, :func:`from_dict`): unknown keys are refused, never ignored.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import tempfile
import typing
from typing import Any, Callable, Iterable

MISSING = dataclasses.MISSING


#: exit codes: bad input (one line, nothing run), and a run stopped by a non-finite or diverged loss
USAGE_ERROR, NONFINITE_EXIT = 2, 3


class UsageError(Exception):
    """Bad input: the command exits with code 2 and this one line."""


# -- declaring options -------------------------------------------------------------------------------

CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "positive": (lambda v: v > 0, "a positive number"),
    "nonneg": (lambda v: v >= 0, ">= 0"),
    "unit": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "any": (lambda v: True, "a number"),
    "rate": (lambda v: v > 0, "positive"),  # step sizes and rates: "--lr must be positive"
}


def device_problem(name: str) -> str | None:
    """Why torch device ``name`` cannot be used here (one line), or None when it can."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return f"'{name}' is not a torch device (cpu, cuda, cuda:N, mps, ...)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return (f"'{name}': CUDA is not available to this torch ({torch.__version__}); install a CUDA build "
                    "of torch or use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"'{name}': this machine has {torch.cuda.device_count()} CUDA device(s)"
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        return f"'{name}': MPS is not available to this torch; use --device cpu"
    if device.type not in ("cpu", "cuda", "mps"):
        return f"'{name}': metaphi runs on cpu, cuda or mps"
    return None


#: checks of text values: name -> a function giving why the value is unusable (one line), or None
def output_file_problem(path: str) -> str | None:
    """Why a result file cannot be written at ``path`` (one line), or None when it can."""
    if os.path.isdir(path):
        return f"{path} is a folder; give a file name (e.g. {os.path.join(path, 'result.json')})"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"the folder of {path} does not exist ({folder}); create it or choose another file"
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        return f"{path} is not writable; choose another file"
    return None


TEXT_CHECKS: dict[str, Callable[[str], str | None]] = {"device": device_problem, "output_file": output_file_problem}


def option(default: Any = MISSING, help: str = "", *, check: str | None = None, choices: Iterable | None = None,
           flag: str | None = None, metavar: str | None = None, positional: bool = False, cli: bool = True,
           default_factory: Callable[[], Any] | None = None):
    """A dataclass field with what the command line and the checks need.

    ``check``: one of :data:`CHECKS` (numbers) or :data:`TEXT_CHECKS` (text) applied to the value (and
    to each item of a list); numbers are always required to be finite. ``choices``: the valid values. ``flag``: the command-line name
    (default ``--field-name``). ``positional``: an optional positional argument instead of a flag.
    ``cli=False``: set from a config file only."""
    metadata = {"help": help, "check": check, "choices": tuple(choices) if choices is not None else None,
                "flag": flag, "metavar": metavar, "positional": positional, "cli": cli}
    if check is not None and check not in CHECKS and check not in TEXT_CHECKS:
        raise ValueError(f"unknown check '{check}' (valid: {', '.join([*CHECKS, *TEXT_CHECKS])})")
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def fields(cls_or_obj) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(cls_or_obj)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(tp):
    """(scalar type, is_list, optional) of a field's annotation."""
    optional = False
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
        optional = True
        rest = [a for a in args if a is not type(None)]
        tp = rest[0] if len(rest) == 1 else str
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (list, tuple):
        inner = args[0] if args else str
        return inner, True, optional
    return tp, False, optional


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return MISSING


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


# -- values ------------------------------------------------------------------------------------------

def _convert(value: Any, tp, name: str) -> Any:
    """``value`` (from YAML or the command line) as type ``tp``, or a UsageError naming ``name``."""
    if value is None:
        return None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UsageError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UsageError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            return int(str(value).strip())
        except ValueError:
            raise UsageError(f"{name} must be an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise UsageError(f"{name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UsageError(f"{name} must be a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise UsageError(f"{name} must be a string, got {value!r}")
        return str(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise UsageError(f"{name} must be a mapping of {tp.__name__}'s options, got {value!r}")
        return from_dict(tp, value, where=name)
    return value  # dict, Any: as given


def _convert_field(f: dataclasses.Field, tp, value: Any, name: str) -> Any:
    base, is_list, _ = _base_type(tp)
    if is_list:
        if value is None:
            return None
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        if base in (int, float):
            try:
                return [_convert(v, base, name) for v in value]
            except UsageError:
                kind = "integers" if base is int else "numbers"
                raise UsageError(f"{name} must be a comma list of {kind}, got {','.join(map(str, value))!r}") from None
        return [_convert(v, base, name) for v in value]
    return _convert(value, base, name)


def check(cfg, where: str = "") -> None:
    """Every field of ``cfg`` (recursively) against its declared check and choices; numbers finite.
    Raises UsageError naming the option."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        name = (where + "." if where else "") + f.name if where else flag_of(f)
        if dataclasses.is_dataclass(value):
            check(value, name)
            continue
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v is None:
                continue
            if isinstance(v, float) and not math.isfinite(v):
                raise UsageError(f"{name} must be a finite number, got {v}")
            if isinstance(v, int) and not isinstance(v, bool) and not -2 ** 63 <= v < 2 ** 63:
                raise UsageError(f"{name} must fit in 64 bits (below 2^63), got {v}")
            choices = f.metadata.get("choices")
            if choices is not None and v not in choices:
                raise UsageError(f"{name}: '{v}' is not one of {', '.join(map(str, choices))}")
            rule = f.metadata.get("check")
            if rule in TEXT_CHECKS and isinstance(v, str):
                problem = TEXT_CHECKS[rule](v)
                if problem:
                    raise UsageError(f"{name}: {problem}")
            elif rule in CHECKS and isinstance(v, (int, float)) and not isinstance(v, bool):
                test, words = CHECKS[rule]
                if not test(v):
                    raise UsageError(f"{name} must be {words}, got {v}")


def to_dict(cfg) -> dict:
    """A plain dict (lists, not tuples) of a config, nested configs included."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(cfg)


def from_dict(cls, data: dict, where: str = "config") -> Any:
    """``cls`` from ``data``; keys ``cls`` lacks are refused with their names, missing ones take defaults."""
    if not isinstance(data, dict):
        raise UsageError(f"{where} must be a mapping of options, got {type(data).__name__}")
    hints = _hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = [k for k in data if k not in known]
    if unknown:
        raise UsageError(f"{where + ': ' if where else ''}unknown option{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(str, unknown))} (valid: {', '.join(known)})")
    values = {k: _convert_field(known[k], hints[k], v, f"{where}: {k}" if where else k) for k, v in data.items()}
    missing = [f.name for f in known.values() if f.name not in values and default_of(f) is MISSING]
    if missing:
        raise UsageError(f"{where + ': ' if where else ''}missing {', '.join(missing)}")
    return cls(**values)


# -- files -------------------------------------------------------------------------------------------

def load_yaml(path: str) -> dict:
    """The mapping in the YAML file ``path``; a UsageError when it cannot be read or is not a mapping."""
    import yaml

    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise UsageError(f"--config: no file at {path}") from None
    except IsADirectoryError:
        raise UsageError(f"--config: {path} is a folder; give a YAML file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--config: cannot read {path} ({e})") from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"--config: {path} is not valid YAML ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config: {path} must hold a mapping of options, not a {type(data).__name__}")
    return data


def save_yaml(data, path: str, header: str = "") -> None:
    """``data`` (a dict or a config) as YAML at ``path``, written atomically."""
    import yaml

    if dataclasses.is_dataclass(data):
        data = to_dict(data)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w") as f:
            if header:
                f.write("".join(f"# {line}\n" for line in header.splitlines()))
            yaml.safe_dump(data, f, sort_keys=False, default_flow_style=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# -- the command line --------------------------------------------------------------------------------

def _show(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) if value else "none"
    if value is None:
        return "none"
    return str(value)


def _cli_fields(cls) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are flags: declared ``cli=True`` and not a nested config."""
    hints = _hints(cls)
    return [f for f in fields(cls) if f.metadata.get("cli", True) and not dataclasses.is_dataclass(hints[f.name])]


def add_options(parser, cls, *, title: str | None = None, skip: Iterable[str] = (), owner: str | None = None) -> None:
    """A flag for each field of ``cls`` (those declared ``cli=True``), to ``parser`` or a group titled
    ``title``. Defaults are not filled in (argparse.SUPPRESS): :func:`from_args` overlays only what the
    user gave. ``owner``: what the options belong to, shown in brackets before each help text."""
    skip = set(skip)
    target = parser.add_argument_group(title) if title else parser
    hints = _hints(cls)
    for f in _cli_fields(cls):
        if f.name in skip:
            continue
        flag = flag_of(f)
        base, is_list, _ = _base_type(hints[f.name])
        default = default_of(f)
        help_text = f.metadata.get("help") or ""
        shown = "required" if default is MISSING else _show(default)
        if owner:
            help_text = f"[{owner}] {help_text}".rstrip()
        help_text = f"{help_text} (default: {shown})".replace("%", "%%")
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text, "dest": f.name}
        if f.metadata.get("metavar"):
            kwargs["metavar"] = f.metadata["metavar"]
        if base is bool and not is_list:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = str if is_list else _cli_type(base, flag)
            choices = f.metadata.get("choices")
            if choices is not None and not is_list:
                kwargs["choices"] = list(choices)
        if f.metadata.get("positional"):
            kwargs.pop("dest")
            if "choices" in kwargs:  # argparse checks an absent optional positional's default against them
                kwargs["choices"] = _PositionalChoices(kwargs["choices"])
            target.add_argument(f.name, nargs="*" if is_list else "?", **kwargs)
        else:
            target.add_argument(flag, **kwargs)


def add_owned_options(parser, owners: dict[str, type], group_title: str | None = None,
                      group_description: str | None = None) -> list[str]:
    """The flags of several owners' options dataclasses (``owners``: a label such as a family's name ->
    its class): one flag per field name, declared by the first owner that has it, its help led by every
    owner's label in brackets ("[maml, fomaml] ..."). In one group titled ``group_title`` (with
    ``group_description``), or without one in a group per owner titled "LABEL options". Returns the
    names (each flag's ``dest``), in the order the flags were added. An owner's flag that the parser
    already has is a ValueError: a programming error in the options class, not a user's."""
    taken = set(parser._option_string_actions)  # the command's own flags
    labels: dict[str, list[str]] = {}
    for label, cls in owners.items():
        for f in _cli_fields(cls):
            labels.setdefault(f.name, []).append(label)
    group = parser.add_argument_group(group_title, group_description) if group_title else None
    added: list[str] = []
    for label, cls in owners.items():
        clash = [flag_of(f) for f in _cli_fields(cls) if flag_of(f) in taken]
        if clash:
            raise ValueError(f"{cls.__name__}: {', '.join(clash)} is already an option of {parser.prog}")
        target = group or parser.add_argument_group(f"{label} options")
        for f in _cli_fields(cls):
            if f.name not in added:
                added.append(f.name)
                add_options(target, cls, skip=[g.name for g in fields(cls) if g.name != f.name],
                            owner=", ".join(labels[f.name]))
    return added


class _PositionalChoices(list):
    """The choices of an optional positional; they also admit argparse.SUPPRESS, the default that says
    'not given' (so a config file can supply the value), which argparse would otherwise reject."""

    def __contains__(self, value) -> bool:
        return value is argparse.SUPPRESS or list.__contains__(self, value)


def _cli_type(base, flag: str):
    """The argparse ``type`` of a field: int and float parsed with a one-line error, anything else a string."""
    words = {int: "an integer", float: "a number"}
    if base not in words:
        return str

    def parse(text: str):
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {words[base]}, got {text!r}") from None

    parse.__name__ = words[base].split()[-1]  # argparse names the type in its own messages
    return parse


def given(args: argparse.Namespace, cls) -> dict:
    """The fields of ``cls`` the user gave on the command line."""
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


def from_args(cls, args: argparse.Namespace, base: dict | None = None, where: str = "") -> Any:
    """``cls`` from its defaults, overlaid by ``base`` (a config file's mapping), overlaid by the flags
    the user gave; then checked."""
    data = dict(base or {})
    data.update(given(args, cls))
    cfg = from_dict(cls, data, where=where)
    check(cfg)
    return cfg


def add_config_option(parser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="read options from this YAML file (a run's config.yaml reproduces it); flags given "
                             "on the command line take precedence")


def file_options(args: argparse.Namespace) -> dict:
    """The mapping of ``--config FILE`` (empty without one)."""
    path = getattr(args, "config", None)
    return load_yaml(path) if path else {}


def resolve(cls, args: argparse.Namespace) -> Any:
    """The config of one command: defaults < ``--config FILE`` < flags, checked."""
    return from_args(cls, args, file_options(args))


# -- small value parsers shared by the commands -----------------------------------------------------

def int_list(text: str, name: str) -> list[int]:
    """A comma list of non-negative integers from option ``--name`` (``"0,1,2"``), or a UsageError."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--{name} must be a comma list of integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise UsageError(f"--{name} must list non-negative integers, got {text!r}")
    return values


def name_list(text: str | list, valid, name: str = "methods") -> list[str]:
    """A comma list of names from option ``--name``, each one of ``valid``, or a UsageError."""
    items = text if isinstance(text, list) else text.split(",")
    names = [m.strip() for m in items if m.strip()]
    bad = [m for m in names if m not in valid]
    if bad or not names:
        raise UsageError(f"--{name}: unknown {', '.join(bad) or '(none)'} (valid: {', '.join(valid)})")
    return names


def positive(name: str, value, allow_zero: bool = False) -> None:
    """A UsageError unless ``value`` (when given) is > 0 (or >= 0 with ``allow_zero``) and finite."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UsageError(f"--{name} must be a finite number, got {value}")
    if value < 0 or (value == 0 and not allow_zero):
        raise UsageError(f"--{name} must be {'>= 0' if allow_zero else 'a positive number'}, got {value}")


def writable_dir(path: str) -> str:
    """``path`` as a folder this process can write to (created if needed) and holds alone
    (:func:`metaphi.lock.claim`), or a UsageError."""
    from metaphi import lock

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".probe-"):
            pass
    except OSError as e:
        raise UsageError(f"--out {path} is not a writable folder ({e.strerror}); choose another with --out")
    lock.claim(path)
    return path
