"""What every algorithm provides to the trainer, the estimators and the evaluator."""
from __future__ import annotations

import warnings

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metaphi.config import from_dict, to_dict
from metaphi.functional import Params
from metaphi.inner.adapt import Unroll
from metaphi.tasks import Task


@dataclass(frozen=True)
class Problem:
    """The loss a learner minimises and the metric reported for it."""

    name: str
    metric: str
    higher_is_better: bool

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        if self.name == "classification":
            return F.cross_entropy(out, y)
        return F.mse_loss(out, y)

    def score(self, out: Tensor, y: Tensor) -> Tensor:
        if self.name == "classification":
            return (out.argmax(-1) == y).float().mean()
        return F.mse_loss(out, y)


CLASSIFICATION = Problem("classification", "accuracy", True)
REGRESSION = Problem("regression", "mse", False)


def problem_named(name: str) -> Problem:
    return {"classification": CLASSIFICATION, "regression": REGRESSION}[name]


@dataclass
class NoOptions:
    """The options of a family that has none of its own."""


def standard_batch_norm(model, stacklevel: int = 3) -> None:
    """Turn the user's ``nn.BatchNorm*`` layers of ``model`` into per-task batch norm, saying so once
    (:func:`metaphi.models.layers.task_batch_norm`)."""
    from metaphi.models.layers import task_batch_norm

    turned = task_batch_norm(model)
    if turned:
        warnings.warn(f"metaphi: batch norm {_listed(turned)} of {type(model).__name__} now normalises each task "
                      "by its own batch statistics (as MAML uses batch norm); running statistics are not kept",
                      stacklevel=stacklevel)


def _listed(names: list[str]) -> str:
    return f"{', '.join(names[:6])}{' ...' if len(names) > 6 else ''}"


def layer_name(name: str, module: nn.Module) -> str:
    """A layer as the one-line refusals name it: "layer 'encoder.2' (LSTM)"."""
    return f"layer '{name}' ({type(module).__name__})" if name else f"the model ({type(module).__name__})"


def take_user_model(model: nn.Module) -> None:
    """What MAML and the metric learners do first with the model they are given, before anything is
    learned: refuse a lazy layer that has not made its parameters yet (a ValueError, one line naming it
    and the fix), and turn the standard normalisation layers into ones that are exact under torch.func
    transforms (batch norm per task, :func:`standard_batch_norm`; instance norm per example and layer
    norm in plain tensor operations, :func:`metaphi.models.layers.exact_norms`), saying once where that
    changes what the model computes. Layers torch cannot ``vmap`` and a forward that changes the model's
    buffers are refused at the first step (:func:`check_first_step`); frozen parameters
    (``requires_grad=False``) are kept as they are (:func:`learnable_names`)."""
    from metaphi.models.layers import exact_norms

    for name, module in model.named_modules():
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError(f"{layer_name(name, module)} has not made its parameters yet (a lazy layer): run the "
                             "model once on an example batch, model(x), before handing it to metaphi")
    standard_batch_norm(model, stacklevel=4)
    running = exact_norms(model)
    if running:
        warnings.warn(f"metaphi: instance norm {_listed(running)} of {type(model).__name__} normalises each example "
                      "by its own statistics at test time too, as in training; running statistics are not kept",
                      stacklevel=3)


def learnable_names(model: nn.Module) -> list[str]:
    """The names of the parameters of ``model`` that φ holds: all but the frozen ones (``requires_grad=False``),
    which are kept as they are, like buffers: neither meta-learned nor adapted, and not in checkpoints."""
    return [k for k, p in model.named_parameters() if p.requires_grad]


#: layers whose torch kernels have no ``vmap`` rule: a model with one runs its tasks one by one
LOOP_ONLY = (nn.RNNBase,)


def loop_only_layers(model: nn.Module) -> list[str]:
    """The layers of ``model`` that torch cannot run under ``vmap`` (LSTM, GRU, RNN), as refusals name them."""
    return [layer_name(name, m) for name, m in model.named_modules() if isinstance(m, LOOP_ONLY)]


def check_first_step(algorithm, tasks: Task, vmapped: bool) -> None:
    """The refusals that need a task, made by the estimators before they compute anything (a ValueError,
    one line naming the layer and the fix), for the algorithms that take a user's model
    (``algorithm.checks_model``):

    * where the tasks would run as one ``vmap`` batch (``vmapped``), a layer torch cannot ``vmap``
      (:func:`loop_only_layers`), whose torch error would not say so;
    * once, at the algorithm's first step, a forward that changes the model's buffers (a call counter,
      running averages of its own): torch.func refuses it inside the inner loop's gradient, and under
      ``vmap`` a batch of tasks would count as one call. The model is run once on the first task's
      support inputs, without gradients and with the random state kept, and its buffers put back.
    """
    model = getattr(algorithm, "model", None)
    if not getattr(algorithm, "checks_model", False) or not isinstance(model, nn.Module):
        return
    if vmapped:
        loop_only = loop_only_layers(model)
        if loop_only:
            raise ValueError(f"{loop_only[0]} does not run under torch.func.vmap, which runs the tasks of a meta-batch "
                             "as one batch: run them one by one with the estimator option loop (loop=True; "
                             "metaphi run --loop)")
    if getattr(algorithm, "_forward_checked", False):
        return
    support = tasks.support[0] if isinstance(tasks.support, (tuple, list)) else tasks.support
    if isinstance(support, Tensor) and support.dim() > 0:
        changed = buffers_changed_by_forward(model, support[0])
        if changed:
            name, buffer = changed[0].rpartition(".")[::2]
            raise ValueError(f"{layer_name(name, model.get_submodule(name))} changes its buffer '{buffer}' when it "
                             "runs: metaphi runs the model as a function of φ, each task apart (torch.func), and a "
                             "forward may not keep state in the module; keep such state outside forward")
    algorithm._forward_checked = True


def buffers_changed_by_forward(model: nn.Module, x: Tensor) -> list[str]:
    """The names of the buffers of ``model`` that ``model(x)`` changes in place or replaces (none: []).
    Run without gradients, on the device of the model's parameters, with the random state kept; every
    buffer is put back as it was."""
    device = next((p.device for p in model.parameters()), x.device)
    before = dict(model.named_buffers())
    versions = {k: b._version for k, b in before.items()}
    values = {k: b.clone() for k, b in before.items()}
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model(x.to(device))
    after = dict(model.named_buffers())
    changed = [k for k, b in before.items() if after.get(k) is not b or b._version != versions[k]]
    changed += [k for k in after if k not in before]
    for k in changed:
        owner, leaf = k.rpartition(".")[::2]
        module = model.get_submodule(owner)
        if k in before:
            with torch.no_grad():
                before[k].copy_(values[k])
            module._buffers[leaf] = before[k]
        else:
            del module._buffers[leaf]
    return changed


def model_spec(model) -> dict:
    """What a checkpoint records of ``model``: a built-in backbone's ``spec`` (which rebuilds it); for a
    module of the user's own its class, ``{"class": "module.QualName"}``, and, where it was built by
    :func:`metaphi.models.from_factory`, the factory and its arguments (which rebuild it when allowed)."""
    from metaphi.models import factory

    spec = getattr(model, "spec", None)
    if isinstance(spec, dict):
        return spec
    made = {"class": f"{type(model).__module__}.{type(model).__qualname__}"}
    return {**made, **factory.recorded(model)} if factory.recorded(model) else made


def rebuild_model(spec: dict):
    """The model of a checkpoint's spec; a ValueError saying what to do for a user's own module."""
    from metaphi.models import build_model, factory

    if "name" not in spec and "factory" in spec:
        return factory.rebuild(spec)
    if "name" not in spec and "class" in spec:
        raise ValueError(f"its model is your own {spec['class']}, which metaphi cannot rebuild: build it with "
                         "metaphi.models.from_factory('module:callable', ...) to have eval and predict rebuild it, "
                         "or build the module yourself and load the weights with model.load_state_dict("
                         "metaphi.checkpoint.module_state(PATH))")
    return build_model(spec)


def _plain(value: Any) -> Any:
    """A constructor argument as plain data for a spec: an update rule by its spec, tuples as lists."""
    if callable(getattr(value, "spec", None)):
        return value.spec()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class Algorithm:
    """A learning algorithm with a learnable part φ.

    Subclasses define:
      ``init_meta_params()``             φ, a flat dict of tensors that require grad
      ``task_loss(phi, task, unroll)``   the query loss after learning the task's support set, with
                                          the inner loop unrolled as ``unroll`` (a metaphi.inner.Unroll,
                                          chosen by the estimator) says, and a dict of metrics
                                          (tensors); differentiable in φ
      ``evaluate(phi, task, steps)``     the query metric after 0..steps inner steps (1-D tensor)
    and may override ``learn`` (used by Reptile's estimator) and ``training_tasks`` (the sampler of
    meta-training tasks, which defaults to the benchmark's episodes).

    A family declares ``Options`` (a dataclass of its own hyperparameters, fields declared with
    ``metaphi.config.option``; the instance is ``self.options``), ``spec_class`` (its key in
    ``metaphi.algorithms.SPEC_CLASSES``) and ``spec_args`` (the constructor's other keyword arguments,
    kept as attributes of the same names). ``spec()`` and ``from_spec`` come from those: the spec is
    plain data (it goes into checkpoints, read back without unpickling code), and
    ``cls.from_spec(spec)`` calls the constructor with the network rebuilt from its spec, the problem,
    the arguments and the options.
    """

    Options: type = NoOptions
    options: Any = NoOptions()
    spec_class: str = ""
    spec_args: tuple[str, ...] = ()

    name: str = "algorithm"
    #: estimators that make sense for this algorithm; the first is the default
    estimators: tuple[str, ...] = ("second-order", "first-order")
    #: whether the trainer has anything to meta-train (the scratch baseline has not)
    trains: bool = True
    #: whether the estimators check the model on the first step (:func:`check_first_step`): the
    #: algorithms that take a user's model
    checks_model: bool = False

    def init_meta_params(self) -> Params:
        raise NotImplementedError

    def task_loss(self, phi: Params, task: Task, unroll: Unroll = Unroll()) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def evaluate(self, phi: Params, task: Task, steps: int) -> Tensor:
        raise NotImplementedError

    def spec(self) -> dict:
        """{"class", "name", "model" (the network's spec, or None), "problem", "args", "options"}."""
        model = getattr(self, "model", None)
        return {"class": self.spec_class, "name": self.name, "model": None if model is None else model_spec(model),
                "problem": self.problem.name, "args": {k: _plain(getattr(self, k)) for k in self.spec_args},
                "options": to_dict(self.options)}

    @classmethod
    def options_for(cls, args: dict) -> type:
        """The options class of an instance built with ``args`` (the family's ``Options``)."""
        return cls.Options

    @classmethod
    def from_spec(cls, spec: dict, options_class: type | None = None) -> "Algorithm":
        """The algorithm ``spec()`` describes, with a freshly initialised network. ``options_class``:
        the class of its options (the one its table name declares; by default the family's)."""
        kwargs = dict(spec["args"])
        if spec["model"] is not None:
            kwargs["model"] = rebuild_model(spec["model"])
        options_class = options_class or cls.options_for(kwargs)
        options = from_dict(options_class, spec["options"], where=f"{spec['name']} options")
        return cls(problem=problem_named(spec["problem"]), options=options, name=spec["name"], **kwargs)

    def training_tasks(self, benchmark: Any, ways: int, shots: int, query: int) -> Callable[[int, torch.Generator], Task]:
        sampler = benchmark.episodes("train", ways, shots, query)
        return sampler.sample_batch

    def predict(self, phi: Params, support: Any, x: Tensor, steps: int) -> Tensor:
        """Outputs (logits or values) for inputs ``x`` after learning ``support``."""
        raise NotImplementedError
