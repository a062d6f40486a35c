"""BatchNorm folded into the convolution that feeds it, for inference.

In eval mode a BatchNorm is an affine per channel, y = (x - mean) / sqrt(var + eps) * gamma + beta; after a
convolution it can live in the convolution's own weights and bias, which saves a pass over every activation: a
large share of a convolutional model's time on the CPU (docs/benchmarks.md). Folding changes what the
convolution returns, so it is done only where a proof says that changes nothing else, whatever the input.

The proof is static, over the whole program: the model traces with torch.fx (a forward that branches on its
input's values does not, and then nothing is folded: a branch the check images never take could read what a fold
changes), and in its graph the convolution's output feeds its BatchNorm and nothing else, each is called once, and
neither's parameters or buffers are read anywhere else (no `F.conv2d(x, self.conv.weight)` beside it), nor shared
with another module. A watched forward pass then confirms it on the run's own images, with every torch call
recorded: the BatchNorm reads the very tensor the convolution returned and nothing else reads it, and neither has
hooks (a hook on the BatchNorm would stop firing; one on the convolution would see other numbers). Every fold is
checked: in that pass, as its BatchNorm returns, the folded convolution must give the BatchNorm's output on the
same input, the first check image's (there, not after the pass, so no layer's activations are kept: they were most
of a run's peak memory), and then the whole model its old scores on every check image, or the model is put back as
it was written.
A failure anywhere means "as written". Where a folded BatchNorm sat, a stand-in passes its input on and still
answers for the BatchNorm's attributes (`num_features`, `eps`, ...).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from harness.models.outputs import same_scores

RTOL = 1e-4  # a fold changes a layer's output by float32 rounding, far below this share of its largest value


@dataclass(frozen=True)
class FoldResult:
    folded: int  # BatchNorms now inside their convolutions
    why: str  # what was done, or why nothing was

    def describe(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass
class _Pair:
    conv: _ConvNd
    norm: _BatchNorm
    agrees: bool  # folded, the convolution gave the BatchNorm's output on the input it saw in the watched pass


@dataclass
class _Undo:
    conv: _ConvNd
    weight: torch.Tensor
    bias: nn.Parameter | None
    norm: _BatchNorm
    places: list[tuple[nn.Module, str]]  # (parent, attribute) wherever the BatchNorm sat


def _foldable_norm(module: nn.Module) -> bool:
    """A plain BatchNorm in eval mode with running statistics: subclasses that add work (timm's BatchNormAct2d
    applies its activation in forward) would lose it."""
    return (
        isinstance(module, _BatchNorm)
        and type(module).forward is _BatchNorm.forward
        and not module.training
        and module.running_mean is not None
        and module.running_var is not None
    )


def _foldable_conv(module: nn.Module) -> bool:
    return isinstance(module, _ConvNd) and not module.transposed and isinstance(module.weight, nn.Parameter)


def fold_batchnorm(model: nn.Module, sample: torch.Tensor, scores: Callable[[object], torch.Tensor]) -> FoldResult:
    """Fold what can be folded in `model` (in eval mode, on its device), checked on `sample` (model inputs: real
    images of the run, a few); `scores` turns the model's output into an N x C tensor. The model is changed in
    place, or left as it was."""
    if not any(_foldable_norm(m) for m in model.modules()):
        return FoldResult(0, "no BatchNorm to fold")
    if _global_hooks():
        return FoldResult(0, "not folded: module hooks are registered globally (they would see other numbers)")
    proven, why_not = proven_pairs(model)
    if proven is None:
        return FoldResult(0, f"not folded: {why_not}")
    try:
        pairs, reference = _watch(model, sample, scores)
    except (Exception, SystemExit):  # the model's own failure: the probe after this reports it to the user
        return FoldResult(0, "not folded: the model failed on the check images")
    pairs = [pair for pair in pairs if (id(pair.conv), id(pair.norm)) in proven]
    if not pairs:
        return FoldResult(0, "no BatchNorm that only a convolution's output feeds, and nothing else reads")
    undo: list[_Undo] = []
    kept = 0
    for pair in pairs:
        if pair.agrees:
            undo.append(_fold(model, pair))
        else:
            kept += 1
    if not undo:
        return FoldResult(0, f"none folded: {kept} folds changed their layer's output")
    try:
        with torch.inference_mode():
            folded = scores(model(sample)).float()
    except (Exception, SystemExit) as error:  # the folded model read something the fold took away
        _restore(undo)
        return FoldResult(0, f"none folded: the folded model failed ({type(error).__name__})")
    if not same_scores(folded, reference):
        _restore(undo)
        return FoldResult(0, "none folded: the folded model gave other scores")
    note = f"; {kept} left as written (folding changed their layer's output)" if kept else ""
    return FoldResult(len(undo), f"{len(undo)} BatchNorms folded into their convolutions{note}")


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer, but a BatchNorm of any class is one call: a subclass's forward (timm's BatchNormAct2d)
    checks its input's rank, which symbolic tracing cannot follow, and such a BatchNorm is never folded anyway."""

    def is_leaf_module(self, module: nn.Module, name: str) -> bool:
        return isinstance(module, _BatchNorm) or super().is_leaf_module(module, name)


CONV_FUNCTIONS = (F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d)


def proven_pairs(model: nn.Module) -> tuple[set[tuple[int, int]] | None, str]:
    """(the (id(conv), id(norm)) pairs a fold provably changes nothing else for, or None), and why None: the static
    half of the proof, over the model's torch.fx graph (this module's docstring). A convolution is a call of a
    torch convolution module, or a convolution function on a convolution module's own weight (a subclass that pads
    first, as EfficientNet's same padding does)."""
    try:
        graph = _Tracer().trace(model)
    except (Exception, SystemExit) as error:  # data-dependent control flow, or code fx cannot follow
        first = str(error).strip().splitlines()[0][:120] if str(error).strip() else ""
        return None, f"the model does not trace with torch.fx ({type(error).__name__}: {first}), so no fold is proven"
    modules = dict(model.named_modules(remove_duplicate=False))
    producers = {node: _producer(node, modules, model) for node in graph.nodes}
    uses = Counter(id(modules[str(node.target)]) for node in graph.nodes if node.op == "call_module")
    uses.update(id(conv) for node, conv in producers.items() if conv is not None and node.op == "call_function")
    reads: dict[int, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "get_attr":
            reads.setdefault(id(_fetch(model, node.target)), []).append(node)
    owners = Counter(id(tensor) for _, module in model.named_modules() for tensor in _own_tensors(module))
    proven = set()
    for node, conv in producers.items():
        user = next(iter(node.users)) if conv is not None and len(node.users) == 1 else None
        if user is None or user.op != "call_module" or user.args[:1] != (node,):
            continue
        norm = modules[user.target]
        if not _foldable_norm(norm) or not uses[id(conv)] == uses[id(norm)] == 1:
            continue
        tensors = [*_own_tensors(conv), *_own_tensors(norm)]
        read_elsewhere = any(set(reader.users) != {node} for tensor in tensors for reader in reads.get(id(tensor), []))
        if not read_elsewhere and all(owners[id(tensor)] == 1 for tensor in tensors):
            proven.add((id(conv), id(norm)))
    return proven, ""


def _producer(node: torch.fx.Node, modules: dict[str, nn.Module], model: nn.Module) -> _ConvNd | None:
    """The foldable convolution module whose output `node` is, or None."""
    if node.op == "call_module":
        module = modules[str(node.target)]
        return module if _foldable_conv(module) else None
    if node.op != "call_function" or node.target not in CONV_FUNCTIONS:
        return None
    weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr" or not str(weight.target).endswith(".weight"):
        return None
    owner = _fetch(model, str(weight.target).rpartition(".")[0])
    if isinstance(owner, _ConvNd) and _foldable_conv(owner) and owner.weight is _fetch(model, str(weight.target)):
        return owner
    return None


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(recurse=False), *(b for b in module.buffers(recurse=False) if b is not None)]


def _fetch(model: nn.Module, target: str) -> object:
    """What a get_attr node reads: a parameter, a buffer, a module or a plain attribute."""
    found: object = model
    for part in target.split("."):
        found = getattr(found, part)
    return found


def _global_hooks() -> bool:
    """Whether any forward hook is registered for every module (torch.nn.modules.module's globals)."""
    from torch.nn.modules import module as torch_module

    names = ("_global_forward_hooks", "_global_forward_pre_hooks")
    return any(bool(getattr(torch_module, name, None)) for name in names)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


# Calls that read a tensor's metadata, not its values: they are no other reader of a convolution's output.
_METADATA_CALLS = frozenset(
    {
        "dim",
        "size",
        "stride",
        "numel",
        "nelement",
        "ndimension",
        "element_size",
        "is_contiguous",
        "is_floating_point",
        "is_complex",
        "get_device",
        "storage_offset",
    }
)
_METADATA_ATTRIBUTES = frozenset(
    {
        "shape",
        "dtype",
        "device",
        "ndim",
        "layout",
        "is_cuda",
        "is_cpu",
        "is_meta",
        "requires_grad",
        "is_sparse",
        "is_quantized",
        "names",
        "grad_fn",
        "is_leaf",
    }
)


def _reads_values(func: Callable[..., object]) -> bool:
    name = getattr(func, "__name__", "")
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", "") not in _METADATA_ATTRIBUTES
    return name not in _METADATA_CALLS


class _Readers(TorchFunctionMode):
    """Records every torch call that reads the values of a watched tensor (a convolution's output) while it lives,
    and which BatchNorm was running when it did. A watched tensor is not held (the pass keeps no activation the
    model itself would not): when it is freed its watch ends, and a new tensor at its address is not mistaken for
    it."""

    def __init__(self) -> None:
        super().__init__()
        self.watched: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}  # a tensor's id: (it, its number)
        self.reads: list[list[tuple[str, nn.Module | None]]] = []  # by the watch's number
        self.norm: nn.Module | None = None  # the BatchNorm whose forward is running
        self.paused = False  # our own checks are no reads

    def watch(self, tensor: torch.Tensor, freed: Callable[[int], None]) -> int:
        """Watch `tensor` until it is freed, then call `freed` with the watch's number, which this returns. A freed
        tensor's entry stays (a few bytes) until a new watch at its address replaces it: `number` tells the two
        apart by the tensor itself."""
        number = len(self.reads)
        self.reads.append([])
        self.watched[id(tensor)] = (weakref.ref(tensor, lambda _: freed(number)), number)
        return number

    def number(self, tensor: torch.Tensor) -> int | None:
        """The watch of `tensor`, or None where it is not watched."""
        entry = self.watched.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if not self.paused and _reads_values(func):
            for leaf in tree_flatten((args, kwargs))[0]:
                number = self.number(leaf) if isinstance(leaf, torch.Tensor) else None
                if number is not None:
                    self.reads[number].append((getattr(func, "__name__", ""), self.norm))
        return func(*args, **kwargs)


def _watch(
    model: nn.Module, sample: torch.Tensor, scores: Callable[[object], torch.Tensor]
) -> tuple[list[_Pair], torch.Tensor]:
    """One forward pass with hooks and every torch call recorded: each (convolution, BatchNorm) where the BatchNorm
    read exactly the tensor the convolution returned and nothing else read it, both called once, the convolution's
    weight its own and neither hooked by anyone else, with whether its fold gave the BatchNorm's output there; and
    the model's scores."""
    convs = [m for m in model.modules() if _foldable_conv(m) and not m._forward_hooks]
    norms = [m for m in model.modules() if _foldable_norm(m) and not _hooked(m)]
    calls: Counter[nn.Module] = Counter()
    produced: dict[int, tuple[_ConvNd, torch.Tensor]] = {}  # by watch: a live output's convolution and its input
    seen: list[tuple[_Pair, int]] = []
    readers = _Readers()

    def after_conv(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if readers.paused:  # a fold's check, below
            return
        calls[module] += 1
        if isinstance(output, torch.Tensor) and inputs and isinstance(inputs[0], torch.Tensor):
            produced[readers.watch(output, lambda number: produced.pop(number, None))] = (module, inputs[0])  # type: ignore[assignment]

    def before_norm(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        readers.norm = module

    def after_norm(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        readers.norm = None
        calls[module] += 1
        number = readers.number(inputs[0]) if inputs and isinstance(inputs[0], torch.Tensor) else None
        entry = produced.pop(number, None) if number is not None else None
        if entry is not None and isinstance(output, torch.Tensor):
            # now: an in-place activation after the BatchNorm (ReLU(inplace=True)) changes its output
            readers.paused = True
            try:  # on the first check image: the whole model's check after the folds takes every one
                agrees = _layer_agrees(entry[0], module, entry[1][:1], output[:1])  # type: ignore[arg-type]
            finally:
                readers.paused = False
            seen.append((_Pair(entry[0], module, agrees), number))  # type: ignore[arg-type]

    hooks = [m.register_forward_hook(after_conv) for m in convs]
    hooks += [m.register_forward_pre_hook(before_norm) for m in norms]
    hooks += [m.register_forward_hook(after_norm) for m in norms]
    try:
        with torch.inference_mode(), readers:
            reference = scores(model(sample)).float()
    finally:
        for hook in hooks:
            hook.remove()
    produced.clear()
    return _alone(model, seen, calls, readers), reference


def _alone(
    model: nn.Module, seen: list[tuple[_Pair, int]], calls: Counter[nn.Module], readers: _Readers
) -> list[_Pair]:
    """The pairs the watched pass saw where nothing else can see a fold: each called once, the convolution's
    weight its own, and its output read by its BatchNorm alone."""
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return [
        pair
        for pair, number in seen
        if calls[pair.conv] == 1
        and calls[pair.norm] == 1
        and owners[id(pair.conv.weight)] == 1
        and pair.norm.num_features == pair.conv.out_channels
        and readers.reads[number] == [("batch_norm", pair.norm)]  # its BatchNorm, and nothing else, read it
    ]


class FoldedBatchNorm(nn.Identity):
    """Where a folded BatchNorm sat: its input passes on unchanged (the convolution before it now does the
    BatchNorm's work), and the BatchNorm's attributes still answer (`self.bn.num_features` in a model's forward)."""

    def __init__(self, norm: _BatchNorm) -> None:
        super().__init__()
        object.__setattr__(self, "folded", norm)  # not a submodule: its parameters are inside the convolution now

    def __getattr__(self, name: str) -> object:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "folded"), name)


def _folded(conv: _ConvNd, norm: _BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """The convolution's weight and bias with the BatchNorm inside them, computed in double precision."""
    with torch.no_grad():
        weight = conv.weight.double()
        scale = norm.running_var.double().add(norm.eps).rsqrt()
        if norm.weight is not None:
            scale = scale * norm.weight.double()
        bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
        shift = norm.bias.double() if norm.bias is not None else torch.zeros_like(scale)
        folded = weight * scale.reshape(-1, *[1] * (weight.dim() - 1))
        return folded.to(conv.weight.dtype), ((bias - norm.running_mean.double()) * scale + shift).to(conv.weight.dtype)


def _fold(model: nn.Module, pair: _Pair) -> _Undo:
    conv, norm = pair.conv, pair.norm
    places = [
        (model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2])
        for name, module in model.named_modules(remove_duplicate=False)
        if module is norm and name
    ]
    undo = _Undo(conv, conv.weight.detach().clone(), conv.bias, norm, places)
    weight, bias = _folded(conv, norm)
    with torch.no_grad():
        conv.weight.copy_(weight)
    conv.bias = nn.Parameter(bias, requires_grad=False)
    for parent, attribute in places:
        setattr(parent, attribute, FoldedBatchNorm(norm))
    return undo


def _layer_agrees(conv: _ConvNd, norm: _BatchNorm, conv_input: torch.Tensor, expected: torch.Tensor) -> bool:
    """The convolution, folded for a moment, gives on `conv_input` what its BatchNorm gave (`expected`)."""
    weight, bias = conv.weight, conv.bias
    folded_weight, folded_bias = _folded(conv, norm)
    try:
        conv.weight = nn.Parameter(folded_weight, requires_grad=False)
        conv.bias = nn.Parameter(folded_bias, requires_grad=False)
        with torch.inference_mode():
            folded = conv(conv_input)
    except Exception:  # a convolution whose forward does not take a bias it did not have
        return False
    finally:
        conv.weight, conv.bias = weight, bias
    if not isinstance(folded, torch.Tensor) or folded.shape != expected.shape:
        return False
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return bool(((folded.float() - expected.float()).abs().max() <= RTOL * max(scale, 1e-6)).item())


def _restore(steps: list[_Undo]) -> None:
    for step in reversed(steps):
        with torch.no_grad():
            step.conv.weight.copy_(step.weight)
        step.conv.bias = step.bias
        for parent, attribute in step.places:
            setattr(parent, attribute, step.norm)
