from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TaskBatchNorm(nn.Module):
    """Batch normalization with the statistics of the batch at hand, always; no running averages.

    This is BatchNorm as MAML uses it: each task is normalised with its own statistics, at training
    and at test time, so nothing leaks between tasks.

    Outside ``vmap`` it is torch's fused batch norm. Under ``torch.func.vmap`` the fused kernel's
    batching rule gives wrong second derivatives (torch 2.13; tests/test_engine.py), and the plain
    tensor formula it would fall back to is slow, so a batch of tasks is folded into the channel
    axis instead: [tasks, N, C, ...] becomes [N, tasks·C, ...], whose per-channel statistics are
    exactly the per-task ones, and the fused kernels (forward and backward) run once for the whole
    batch (``_FoldedBatchNorm``). Where that path does not apply (third derivatives under vmap, a
    torch without the functorch interpreter stack, or code being compiled by ``torch.compile``,
    whose compiler fuses the formula itself) the plain formula is used; it is the reference.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return _task_batch_norm(x, self.weight, self.bias, self.eps)


def _task_batch_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """What :class:`TaskBatchNorm` computes, on the path the transforms at hand allow (see there)."""
    if torch.compiler.is_compiling():  # traced: the compiler fuses the formula, under any transform
        return task_batch_norm_reference(x, weight, bias, eps)
    mode = _transform_mode()
    if mode == "none":
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    if mode == "vmap":
        return _FoldedBatchNorm.apply(x, weight, bias, eps)
    return task_batch_norm_reference(x, weight, bias, eps)


class TaskInstanceNorm(TaskBatchNorm):
    """Instance normalization (each example and channel by its own statistics), always; no running
    averages. It is batch norm of the batch laid out as one example with N·C channels, so it runs on
    :class:`TaskBatchNorm`'s kernels, exact under ``vmap`` (torch's own instance norm is batch norm
    inside, with the same wrong second derivatives under ``vmap``). ``no_batch_dim``: the number of
    dimensions of an input without a batch axis (what the replaced ``nn.InstanceNorm*`` accepts)."""

    def __init__(self, channels: int, eps: float = 1e-5, no_batch_dim: int = 3):
        super().__init__(channels, eps)
        self.no_batch_dim = no_batch_dim

    def forward(self, x: Tensor) -> Tensor:
        single = x.dim() == self.no_batch_dim
        h = x.unsqueeze(0) if single else x
        n = h.shape[0]
        out = _task_batch_norm(h.reshape(1, -1, *h.shape[2:]), self.weight.repeat(n), self.bias.repeat(n), self.eps)
        out = out.reshape(h.shape)
        return out.squeeze(0) if single else out


class PlainLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters, same state dict) in plain tensor operations: torch's fused layer
    norm gives wrong second derivatives under ``vmap`` with batched weights (torch 2.13), the formula
    is exact under any composition of torch.func transforms."""

    def forward(self, x: Tensor) -> Tensor:
        dims = tuple(range(-len(self.normalized_shape), 0))
        var, mean = torch.var_mean(x, dim=dims, keepdim=True, unbiased=False)
        out = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            out = out * self.weight
        if self.bias is not None:
            out = out + self.bias
        return out


def task_batch_norm_reference(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """Batch norm in plain tensor operations: correct under any composition of torch.func transforms."""
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x, dim=dims, keepdim=True, unbiased=False)
    shape = [1, -1] + [1] * (x.dim() - 2)
    return (x - mean) * torch.rsqrt(var + eps) * weight.view(shape) + bias.view(shape)


def _transform_mode() -> str:
    """"none" outside torch.func transforms (plain autograd and ``torch.func.grad`` alone), "vmap"
    when the folded kernels apply (one ``vmap`` with at most one ``grad`` inside it), "plain"
    otherwise."""
    get_stack = getattr(torch._C._functorch, "get_interpreter_stack", None)
    if get_stack is None:
        return "plain"
    stack = get_stack()
    if not stack:
        return "none"
    kinds = [i.key() for i in stack]
    vmap, grad = torch._C._functorch.TransformType.Vmap, torch._C._functorch.TransformType.Grad
    if vmap not in kinds:
        return "none" if all(k == grad for k in kinds) else "plain"
    if kinds.count(vmap) > 1:
        return "plain"
    above = kinds[kinds.index(vmap) + 1:]
    return "vmap" if all(k == grad for k in above) and len(above) <= 1 else "plain"


def _fold(t: Tensor, dim: int | None, batch: int) -> Tensor:
    """[.., tasks at ``dim``, ..] laid out (N, C, ...) -> [N, tasks·C, ...]."""
    t = t.movedim(dim, 0) if dim is not None else t.unsqueeze(0).expand(batch, *t.shape)
    t = t.movedim(0, 1)
    return t.reshape(t.shape[0], -1, *t.shape[3:])


def _fold_channels(t: Tensor, dim: int | None, batch: int) -> Tensor:
    """Per-channel [C] (batched at ``dim``) -> [tasks·C], matching ``_fold``."""
    t = t.movedim(dim, 0) if dim is not None else t.unsqueeze(0).expand(batch, *t.shape)
    return t.reshape(-1)


def _unfold(t: Tensor, batch: int) -> Tensor:
    t = t.reshape(t.shape[0], batch, -1, *t.shape[2:])
    return t.movedim(1, 0)


def _saved_statistics(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    # the fused backward takes the statistics as constants and differentiates them itself
    dims = [0] + list(range(2, x.dim()))
    var, mean = torch.var_mean(x.detach(), dim=dims, unbiased=False)
    return mean, torch.rsqrt(var + eps)


class _FoldedBatchNorm(torch.autograd.Function):
    """Task batch norm whose vmap rule folds the task axis into the channels (see TaskBatchNorm)."""

    generate_vmap_rule = False

    @staticmethod
    def forward(x, weight, bias, eps):
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, eps = inputs
        ctx.save_for_backward(x, weight)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        gx, gw, gb = _FoldedBatchNormBackward.apply(grad, x, weight, ctx.eps)
        return gx, gw, gb, None

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, eps):
        b = info.batch_size
        out = F.batch_norm(_fold(x, in_dims[0], b), None, None, _fold_channels(weight, in_dims[1], b),
                           _fold_channels(bias, in_dims[2], b), True, 0.0, eps)
        return _unfold(out, b), 0


class _FoldedBatchNormBackward(torch.autograd.Function):
    """The fused batch-norm backward, folded the same way under vmap. Its physical call is recorded
    by the enclosing autograd with torch's own double-backward formula, which is what makes the
    second-order meta-gradient through it exact."""

    generate_vmap_rule = False

    @staticmethod
    def forward(grad, x, weight, eps):
        mean, invstd = _saved_statistics(x, eps)
        return torch.ops.aten.native_batch_norm_backward(grad, x, weight, None, None, mean, invstd, True, eps,
                                                         [True, True, True])

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        # _transform_mode sends nested grad levels to the plain formula, so this is never reached
        raise NotImplementedError("third derivatives of the folded task batch norm")

    @staticmethod
    def vmap(info, in_dims, grad, x, weight, eps):
        b = info.batch_size
        xf = _fold(x, in_dims[1], b)
        mean, invstd = _saved_statistics(xf, eps)
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            _fold(grad, in_dims[0], b), xf, _fold_channels(weight, in_dims[2], b), None, None, mean, invstd, True,
            eps, [True, True, True])
        return (_unfold(gx, b), gw.reshape(b, -1), gb.reshape(b, -1)), (0, 0, 0)


#: feature maps with at most this many positions (8x8) are convolved as an explicit matrix product
#: inside compiled code (see Conv2d)
SMALL_MAP = 64


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same state dict) that, inside code compiled by ``torch.compile``,
    convolves small feature maps as im2col and one matrix product (``conv2d_gemm``).

    A few-shot convnet's deep layers see a handful of images with 4x4 or 7x7 maps, where a library
    convolution call costs its fixed overhead rather than its arithmetic; in a compiled second-order
    meta-gradient there are about thirty such calls per task (forward, backward and the backward of
    the backward). As a gather and a matrix product the compiler fuses the gather with its
    neighbours and calls the BLAS once. Measured on the 2-core CPU, second-order MAML 5w1s with 1
    query per class, compiled: 87 → 105 tasks/s; in eager code, and for larger maps, the library
    convolution was as fast or faster, so it is kept there. Same result to rounding
    (tests/test_compiled_estimator.py).
    """

    def forward(self, x: Tensor) -> Tensor:
        if (torch.compiler.is_compiling() and self.groups == 1 and self.dilation == (1, 1)
                and self.padding_mode == "zeros" and not isinstance(self.padding, str) and x.dim() == 4
                and x.shape[-2] * x.shape[-1] <= SMALL_MAP):
            return conv2d_gemm(x, self.weight, self.bias, self.stride, self.padding)
        return super().forward(x)


def conv2d_gemm(x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int],
                padding: tuple[int, int]) -> Tensor:
    """``F.conv2d`` (groups 1, dilation 1, zero padding) as im2col (``F.unfold``) and a matrix product."""
    n, _, h, w = x.shape
    out_channels, _, kh, kw = weight.shape
    cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # [n, in·kh·kw, positions]
    out = weight.reshape(out_channels, -1) @ cols
    if bias is not None:
        out = out + bias[:, None]
    ho = (h + 2 * padding[0] - kh) // stride[0] + 1
    wo = (w + 2 * padding[1] - kw) // stride[1] + 1
    return out.reshape(n, out_channels, ho, wo)


class GroupNorm(nn.Module):
    """Group normalization (Wu & He 2018) in plain tensor operations: per example, no batch statistics.

    Batch statistics would normalise every test batch of the held-out domain with that domain's own
    statistics, which is a form of unsupervised adaptation (AdaBN), and would mix the domains of a
    pooled batch; per-example statistics keep domain generalization honest. Written in plain tensor
    operations, as TaskBatchNorm is, so second derivatives under ``vmap`` use no fused kernel.
    """

    def __init__(self, channels: int, groups: int = 4, eps: float = 1e-5):
        super().__init__()
        if channels % groups:
            raise ValueError(f"{channels} channels do not split into {groups} groups")
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        n, c = x.shape[:2]
        g = x.reshape(n, self.groups, -1)
        mean = g.mean(-1, keepdim=True)
        var = g.var(-1, keepdim=True, unbiased=False)
        g = (g - mean) * torch.rsqrt(var + self.eps)
        shape = [1, c] + [1] * (x.dim() - 2)
        return g.reshape(x.shape) * self.weight.view(shape) + self.bias.view(shape)


def task_batch_norm(model: nn.Module) -> list[str]:
    """Turn every standard batch norm of ``model`` (``nn.BatchNorm1d/2d/3d``) into :class:`TaskBatchNorm`,
    in place, keeping its affine weights under the same names; the names of the layers turned.

    This is how MAML uses batch norm: each task normalised by its own batch statistics, at training and
    at test time, with no running averages (whose in-place updates torch's transforms refuse, and which
    would carry one task's statistics into the next). It also routes around torch's batch-norm kernel,
    whose batching rule gives wrong second derivatives under ``vmap`` (see :class:`TaskBatchNorm`). A
    batch norm without affine weights is turned into one with weights fixed at 1 and 0, frozen.
    ``nn.SyncBatchNorm`` is turned too: a task lives on one process, and its statistics are its own."""
    def make(child, name):
        if _plain_batch_norm(child):
            return _affine_like(TaskBatchNorm(child.num_features, eps=child.eps), child)
        if _batch_norm_act(child):  # timm's BatchNormAct2d: batch norm, then its own dropout and activation
            return _affine_like(TaskBatchNormAct(child.num_features, child.eps, child.drop, child.act), child)
        raise ValueError(f"layer '{name}' ({type(child).__name__}) is a batch norm with a forward of its own, which "
                         "metaphi cannot turn into per-task batch norm without changing what it computes: build the "
                         "model with nn.BatchNorm1d/2d/3d (and the rest of that forward as layers of their own)")

    return _replace(model, lambda child: isinstance(child, nn.modules.batchnorm._BatchNorm), make)


def _plain_batch_norm(child: nn.Module) -> bool:
    """Torch's own batch norm, or a subclass that keeps its forward."""
    return type(child).forward in (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward)


def _batch_norm_act(child: nn.Module) -> bool:
    """timm's ``BatchNormAct2d`` and its kind: batch norm followed by the modules ``drop`` and ``act``."""
    return {k for k, _ in child.named_children()} == {"drop", "act"}


class TaskBatchNormAct(TaskBatchNorm):
    """:class:`TaskBatchNorm` followed by dropout and an activation (what timm's ``BatchNormAct2d`` computes,
    with per-task statistics): the weights keep their names (``weight``, ``bias``)."""

    def __init__(self, channels: int, eps: float, drop: nn.Module, act: nn.Module):
        super().__init__(channels, eps)
        self.drop, self.act = drop, act

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(super().forward(x)))


def exact_norms(model: nn.Module) -> list[str]:
    """Turn every ``nn.InstanceNorm1d/2d/3d`` of ``model`` into :class:`TaskInstanceNorm` and every
    ``nn.LayerNorm`` into :class:`PlainLayerNorm`, in place, keeping their weights under the same names:
    torch's kernels for both give wrong second derivatives under ``vmap``. Returns the names of the
    instance norms that kept running statistics, which are now dropped: each example is normalised by
    its own statistics at test time too, as in training (and as :func:`task_batch_norm` does for tasks);
    for the others nothing the model computes changes. Subclasses (a layer norm over the channels of an
    image, say) compute something else and are left as they are."""
    running = []

    def instance(child, name):
        if child.track_running_stats:
            running.append(name)
        return _affine_like(TaskInstanceNorm(child.num_features, child.eps, child._get_no_batch_dim()), child)

    def layer(child, name):
        child.__class__ = PlainLayerNorm
        return child

    _replace(model, lambda child: type(child) in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d), instance)
    _replace(model, lambda child: type(child) is nn.LayerNorm, layer)
    return running


def _affine_like(layer: TaskBatchNorm, child: nn.Module) -> TaskBatchNorm:
    """``layer`` with the affine weights of the replaced ``child`` (the same parameters), or with weights
    fixed at 1 and 0, as buffers, where ``child`` has none."""
    if child.affine:
        layer.weight = child.weight
        layer.bias = child.bias
    else:
        channels = layer.weight.shape[0]
        del layer.weight, layer.bias
        layer.register_buffer("weight", torch.ones(channels))
        layer.register_buffer("bias", torch.zeros(channels))
    return layer


def _replace(model: nn.Module, chosen, make) -> list[str]:
    """Replace every submodule that is ``chosen(child)`` by ``make(child, its name)``; the names replaced."""
    turned = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if chosen(child):
                full = f"{name}.{child_name}" if name else child_name
                setattr(module, child_name, make(child, full))
                turned.append(full)
    return turned
