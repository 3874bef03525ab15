"""What a critic argument of the fused ops computes: read from the objects given, never assumed.

A critic is an MLP on ``concat(s, a)``: Linear layers with one activation after every layer but the
last, the last mapping to one output. The ops take it in one of these forms:

- an ``nn.Module`` (``nn.Sequential``, or a module whose forward calls its submodules): its Linear
  layers **and its activation modules**, in registration order (``nn.ReLU``, ``nn.ELU(alpha)``,
  ``nn.LeakyReLU(negative_slope)``, ``nn.SiLU``, ``nn.Tanh``, ``nn.GELU`` exact or ``"tanh"``;
  ``nn.Identity`` and, in eval mode or with p = 0, ``nn.Dropout`` are skipped). A Linear layer is
  ``nn.Linear`` or a subclass that keeps ``nn.Linear.forward``; a parametrized one
  (``torch.nn.utils.parametrize``: ``parametrizations.weight_norm`` / ``spectral_norm``) is read
  through its parametrization at every call (``layer.weight`` computes it). Once per module (and
  again whenever its signature changes: submodules, classes, shapes, train/eval mode, activation
  settings, hooks) that reading is checked against the module's own forward on a few rows (called
  as ``forward(obs, actions)``, or ``forward(concat(s, a))`` for an ``nn.Sequential`` or when the
  two-argument call is refused). A module that cannot be read this way is *opaque*: a LayerNorm, a
  residual, an activation applied with ``torch.nn.functional`` in forward and no ``activation=``, a
  Linear subclass with its own forward (a LoRA adapter), a hook (forward, pre-forward or backward,
  on any submodule or global: legacy ``torch.nn.utils.weight_norm`` / ``spectral_norm`` rebuild the
  weight in one), a parameter or buffer outside the Linear layers, or a forward that disagrees. The
  torch path evaluates an opaque module with its own forward, the Triton path refuses it with a
  :class:`CriticArchitectureError` naming the module and the reason.
- a sequence of ``(weight, bias)`` pairs or ``nn.Linear`` per critic, or stacked layers
  ``[(weight (E, out, in), bias (E, out)), ...]``: the tensors carry no activation, so the call must
  name it (``activation=``), unless the layers carry one themselves
  (``misa_fast.nets.StackedLayers``, what ``EnsembleCritic.stacked_layers()`` returns).
- a module with ``stacked_layers()`` (``misa_fast.nets.TwinCritic`` / ``EnsembleCritic``): its
  layers and its activation. A layer-normalised one (``EnsembleCritic(layer_norm=True)``, whose
  layers carry ``norms``) is opaque: the torch path runs its own forward, the Triton path refuses
  it; its bare layers (stacked or per critic) are refused everywhere.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from misa_fast.nets import ACTIVATION_NAMES, Activation, activation_spec, apply_activation, layers_activation

__all__ = ["CriticArchitectureError", "Critic", "CriticSet", "resolve_critics", "module_q"]

Layer = Tuple[torch.Tensor, Optional[torch.Tensor]]


class CriticArchitectureError(ValueError):
    """A critic the op cannot compute as given (raised instead of computing another network)."""


@dataclass
class Critic:
    """One critic. ``layers`` and ``activations`` (one per hidden layer) when it is an MLP the op
    models exactly; ``module`` alone (with ``why`` it is opaque) when only its forward can run it."""

    layers: Optional[List[Layer]] = None
    activations: Optional[List[Activation]] = None
    module: Optional[nn.Module] = None
    why: Optional[str] = None
    concat_call: Optional[bool] = None  # module called as forward(concat(s, a)); None: not known yet
    member: Optional[int] = None  # the critic's index when its module's forward returns every member's Q
    reading: Optional["_Reading"] = None  # the cache entry that learns concat_call

    @property
    def modeled(self) -> bool:
        return self.layers is not None


@dataclass
class CriticSet:
    critics: List[Critic]
    stacked: Optional[List[Layer]] = None  # the stacked layers when the critics came stacked
    names: List[str] = field(default_factory=list)  # how to name critic i in an error

    def opaque(self) -> List[Tuple[str, str]]:
        return [(n, c.why) for n, c in zip(self.names, self.critics) if not c.modeled]

    def activation(self) -> Optional[Activation]:
        """The one activation of every hidden layer of every critic, or None if they differ."""
        acts = {a for c in self.critics if c.modeled for a in c.activations}
        return next(iter(acts)) if len(acts) == 1 and all(c.modeled for c in self.critics) else None


# ----------------------------------------------------------------------------------------------
# raw layers
# ----------------------------------------------------------------------------------------------
def _explicit(activation) -> Optional[Activation]:
    if activation is None:
        return None
    spec = activation_spec(activation)
    if spec is None:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATION_NAMES}, an activation "
                         "module (nn.ReLU(), nn.ELU(alpha), nn.LeakyReLU(slope), ...) or misa_fast.nets.Activation")
    return spec


def _raw_activation(layers, activation: Optional[Activation], what: str) -> Activation:
    carried = layers_activation(layers)
    if carried is not None and activation is not None and carried != activation:
        raise CriticArchitectureError(f"{what}: activation={activation} was given but the layers carry {carried} "
                                      "(the network they came from)")
    spec = layers_activation(layers, activation)
    if spec is None:
        raise CriticArchitectureError(
            f"{what}: plain (weight, bias) tensors do not say which activation runs between the layers; pass "
            f"activation= (one of {ACTIVATION_NAMES}, or an activation module such as nn.ReLU()), or pass the "
            "critic modules themselves")
    return spec


def _raw_layers(items, what: str) -> List[Layer]:
    layers: List[Layer] = []
    for item in items:
        if isinstance(item, nn.Linear):
            why = _linear_problem(item)
            if why is not None:  # no module forward to fall back on: the layers are all there is
                raise CriticArchitectureError(f"{what}: layer {len(layers)}: {why}; the op cannot compute it from "
                                              "its weight and bias (pass the critic module itself)")
            layers.append((item.weight, item.bias))
        else:
            w, b = item
            layers.append((w, b))
    if len(layers) < 2:
        raise ValueError(f"{what}: a critic needs at least two Linear layers, got {len(layers)}")
    return layers


# ----------------------------------------------------------------------------------------------
# modules
# ----------------------------------------------------------------------------------------------
_SKIPPED = (nn.Identity,)
_DROPOUTS = (nn.Dropout, nn.AlphaDropout, nn.FeatureAlphaDropout)
_HOOK_KINDS = (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"),
               ("_backward_pre_hooks", "backward pre-hook"), ("_backward_hooks", "backward hook"))
_GLOBAL_HOOKS = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks",
                 "_global_backward_hooks")


def _global_hooks() -> Optional[str]:
    """Which module hooks are registered for every module (nn.modules.module.register_module_*), if any."""
    registry = torch.nn.modules.module
    kinds = [name[len("_global_"):-1].replace("_", " ") for name in _GLOBAL_HOOKS if getattr(registry, name, None)]
    return ", ".join(kinds) if kinds else None


def _hooks(m: nn.Module) -> Optional[str]:
    """The hooks registered on ``m`` (the op bypasses its __call__, so none of them would run)."""
    found = []
    for attr, kind in _HOOK_KINDS:
        for hook in (getattr(m, attr, None) or {}).values():
            owner = type(hook).__module__ + "." + type(hook).__qualname__
            if owner.startswith("torch.nn.utils.weight_norm."):
                kind += " (legacy torch.nn.utils.weight_norm: use torch.nn.utils.parametrizations.weight_norm)"
            elif owner.startswith("torch.nn.utils.spectral_norm."):
                kind += " (legacy torch.nn.utils.spectral_norm: use torch.nn.utils.parametrizations.spectral_norm)"
            found.append(kind)
    return ", ".join(dict.fromkeys(found)) if found else None


def _linear_class(m: nn.Module) -> type:
    """The layer's own class (a parametrized layer's class is a generated subclass of it)."""
    cls = type(m)
    return cls.__bases__[0] if parametrize.is_parametrized(m) else cls


def _linear_problem(m: nn.Linear) -> Optional[str]:
    """Why ``m`` is not computed by F.linear(x, m.weight, m.bias) when called, or None. The weight
    and bias are read when the op runs, so a parametrization computes them as the layer would."""
    cls = _linear_class(m)
    if cls.forward is not nn.Linear.forward or cls.__call__ is not nn.Module.__call__:
        return f"{cls.__name__} is an nn.Linear subclass with its own forward"
    if "forward" in m.__dict__:
        return f"{cls.__name__} has its own forward (assigned to the instance)"
    hooks = _hooks(m)
    if hooks:
        return f"{cls.__name__} has a {hooks}"
    return None


def _units(module: nn.Module, path: str = ""):
    """(path, module) of every module, every occurrence (one activation module may be registered
    between several layers), not descending into Linear layers (a parametrization lives inside)."""
    yield path, module
    if isinstance(module, nn.Linear):
        return
    for name, child in module._modules.items():
        if child is not None:
            yield from _units(child, f"{path}.{name}" if path else name)


def _is_leaf(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or not any(c is not None for c in m._modules.values())


def _read_module(module: nn.Module, activation: Optional[Activation]):
    """(linear modules, activations) read from the module's leaves, or a string saying why not."""
    hooks = _global_hooks()
    if hooks:
        return f"a global {hooks} is registered (torch.nn.modules.module.register_module_*)"
    linears: List[nn.Linear] = []
    acts: List[Activation] = []
    pending: Optional[Activation] = None
    saw_act_module = False
    for path, m in _units(module):
        name = type(m).__name__
        where = f"{name} {path!r}" if path else name
        if not isinstance(m, nn.Linear):
            hooks = _hooks(m)
            if hooks:
                return f"{where} has a {hooks}"
            if path and "forward" in m.__dict__:  # the critic's own forward is what the check calls
                return f"{where} has its own forward (assigned to the instance)"
        if not _is_leaf(m):
            own = [n for n, t in list(m._parameters.items()) + list(m._buffers.items()) if t is not None]
            if own:
                return f"{where} holds {', '.join(own)} outside its Linear layers (its forward may use them)"
            continue
        if isinstance(m, nn.Linear):
            why = _linear_problem(m)
            if why is not None:
                return f"layer {path!r}: {why}" if path else why
            if linears:
                if pending is None:
                    if saw_act_module or activation is None:
                        return (f"no activation module between Linear layers {len(linears) - 1} and {len(linears)}"
                                + ("" if saw_act_module else
                                   " (an activation applied in forward cannot be read: pass activation=)"))
                    pending = activation
                acts.append(pending)
            elif pending is not None:
                return f"{name} before the first Linear layer"
            linears.append(m)
            pending = None
            continue
        if type(m) in _SKIPPED:
            continue
        if type(m) in _DROPOUTS:
            if m.training and m.p > 0:
                return f"{name}(p={m.p}) in training mode between the layers"
            continue
        spec = activation_spec(m)
        if spec is None:
            what = "layer" if any(True for _ in m.parameters(recurse=False)) else "module"
            return f"{what} {name} is not a Linear layer nor an activation the op models ({ACTIVATION_NAMES})"
        if pending is not None:
            return f"two activations in a row ({pending} then {spec})"
        if not linears:
            return f"activation {name} before the first Linear layer"
        if activation is not None and spec != activation:
            raise CriticArchitectureError(f"activation={activation} was given but the module applies {spec}")
        saw_act_module = True
        pending = spec
    if pending is not None:
        return f"an activation ({pending}) after the last Linear layer"
    if len(linears) < 2:
        return f"{len(linears)} Linear layer(s): a critic needs at least two (one hidden layer)"
    for i in range(1, len(linears)):
        if linears[i].in_features != linears[i - 1].out_features:
            return (f"Linear layer {i} takes {linears[i].in_features} inputs but layer {i - 1} gives "
                    f"{linears[i - 1].out_features}")
    if linears[-1].out_features != 1:
        return f"the last Linear layer has {linears[-1].out_features} outputs, not 1"
    return linears, acts


def _call(module: nn.Module, obs: torch.Tensor, act: torch.Tensor, concat: bool) -> torch.Tensor:
    if concat:
        return module(torch.cat([obs, act], -1))
    return module(obs, act)


def _call_convention(module: nn.Module, obs: torch.Tensor, act: torch.Tensor):
    """(concat?, output) for a first call, or raises CriticArchitectureError."""
    errors = []
    orders = (True,) if isinstance(module, nn.Sequential) else (False, True)
    for concat in orders:
        try:
            out = _call(module, obs, act, concat)
        except (TypeError, RuntimeError, ValueError) as e:  # wrong arity / shapes
            errors.append(f"{'forward(concat(s, a))' if concat else 'forward(obs, actions)'}: {e}")
            continue
        if not torch.is_tensor(out) or out.numel() != obs.shape[0]:
            errors.append(f"{'forward(concat(s, a))' if concat else 'forward(obs, actions)'} returned "
                          f"{tuple(out.shape) if torch.is_tensor(out) else type(out).__name__} for {obs.shape[0]} rows")
            continue
        return concat, out
    raise CriticArchitectureError("cannot evaluate the critic module: " + "; ".join(errors))


def _mlp(obs, act, linears, acts):
    h = torch.cat([obs, act], -1)
    for i, lin in enumerate(linears):
        h = torch.nn.functional.linear(h, lin.weight, lin.bias)
        if i < len(acts):
            h = apply_activation(h, acts[i])
    return h.reshape(-1)


@dataclass(eq=False)
class _Reading:
    """What was read from one module, kept between calls. It holds no reference to the module or
    its layers (weak references only): the cache must not keep a critic the caller dropped alive."""

    signature: tuple
    linears: Optional[List["weakref.ref[nn.Linear]"]] = None
    activations: Optional[List[Activation]] = None
    why: Optional[str] = None
    concat_call: Optional[bool] = None
    informative: bool = True  # False: a constant output proved nothing, check again next call


# id(module) -> _Reading; a finalizer drops the entry when the module dies (before its id can be
# reused). Integer keys rather than a WeakKeyDictionary: torch.compile guards on one entry by its key,
# not on the position of weak references that the garbage collector may remove while it compiles.
_CACHE: Dict[int, _Reading] = {}
_CHECK_ROWS = 4


def _remember(module: nn.Module, reading: _Reading) -> None:
    key = id(module)
    if key not in _CACHE:
        weakref.finalize(module, _CACHE.pop, key, None)
    _CACHE[key] = reading


def _instance_forward(m: nn.Module):
    """A forward assigned to the instance, by weak reference where it can be one (a bound method
    of the module would otherwise keep it alive from the cache); None without one."""
    forward = m.__dict__.get("forward")
    if forward is None:
        return None
    try:
        return weakref.ref(forward)  # equal while the same function is alive; a dead one equals nothing
    except TypeError:
        return forward


def _unit_signature(m: nn.Module) -> tuple:
    if isinstance(m, nn.Linear):
        params = (m._parameters.get("weight"), m._parameters.get("bias"))
        shapes = tuple(None if p is None else (tuple(p.shape), p.dtype) for p in params)
        return (id(m), type(m), m.training, bool(_hooks(m)), shapes, m.in_features, m.out_features,
                _instance_forward(m))
    spec = activation_spec(m)  # an activation's setting (LeakyReLU slope, ELU alpha, GELU approximation)
    p = getattr(m, "p", None) if type(m) in _DROPOUTS else None
    return (id(m), type(m), m.training, bool(_hooks(m)), spec, p, _instance_forward(m),
            tuple(m._parameters), tuple(m._buffers))


def _signature(module: nn.Module, activation) -> tuple:
    """Everything the reading depends on; compared at every call, so a change is never missed
    (an activation's setting changed in place, a hook added, a layer swapped or parametrized)."""
    return (activation, _global_hooks() is not None, tuple(_unit_signature(m) for _, m in _units(module)))


def _check_tolerance() -> float:
    return 1e-4 if torch.get_float32_matmul_precision() == "highest" else 1e-2


def _read_and_check(module: nn.Module, activation: Optional[Activation], obs, actions, sig) -> _Reading:
    read = _read_module(module, activation)
    if isinstance(read, str):
        # opaque: no check call (its forward may have state, e.g. batch-norm statistics); the torch
        # path calls it on the real rows only
        return _Reading(sig, why=read)
    linears, acts = read
    dtype = linears[0].weight.dtype
    B, K, A = actions.shape
    # Fixed probe rows (no random draw: vmap forbids one), after the caller's first rows where they
    # are plain tensors (under vmap they are batched, and the check compares single numbers).
    o = 6.0 * _probe_rows(_CHECK_ROWS, obs.shape[1], 0, obs.device, dtype) - 3.0
    a = 2.0 * _probe_rows(_CHECK_ROWS, A, 1, obs.device, dtype) - 1.0
    if not (_transformed(obs) or _transformed(actions)):
        n_real = min(B, 2)
        real_o = obs[:n_real].detach().unsqueeze(1).expand(n_real, min(K, 2), obs.shape[1])
        o = torch.cat([real_o.reshape(-1, obs.shape[1]).to(dtype), o])
        a = torch.cat([actions[:n_real, :2].detach().reshape(-1, A).to(dtype), a])
    # parametrize.cached(): a parametrized weight is computed once for the forward and the reading
    # (spectral_norm's power iteration steps once, as in one forward)
    with torch.no_grad(), parametrize.cached():
        concat, out = _call_convention(module, o, a)
        out = out.reshape(-1)
        if linears[0].in_features != obs.shape[1] + A:
            return _Reading(sig, concat_call=concat,
                            why=f"its first Linear layer takes {linears[0].in_features} inputs, obs + action dims "
                                f"are {obs.shape[1] + A}")
        mine = _mlp(o, a, linears, acts)
        scale = max(out.abs().max().item(), mine.abs().max().item(), 1e-30)
        diff = (out.float() - mine.float()).abs().max().item()
        spread = (out - out.mean()).abs().max().item()
    if not diff <= _check_tolerance() * scale:
        return _Reading(sig, concat_call=concat,
                        why=(f"its forward does not compute the MLP of its Linear and activation modules on "
                             f"concat(s, a) (largest difference {diff:.3g} at output scale {scale:.3g} on "
                             f"{o.shape[0]} rows)"))
    return _Reading(sig, [weakref.ref(m) for m in linears], list(acts), concat_call=concat,
                    informative=spread > 1e-6 * max(scale, 1.0))


def _transformed(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is wrapped by a torch.func transform (vmap, grad, ...)."""
    return torch._C._functorch.is_functorch_wrapped_tensor(tensor)


def _probe_rows(n: int, width: int, stream: int, device, dtype) -> torch.Tensor:
    """``n`` x ``width`` fixed values spread over [0, 1) (a hash of the position, not a draw)."""
    i = torch.arange(n * width, dtype=torch.float64, device=device).reshape(n, width) + 1000.0 * stream
    return torch.frac(torch.sin(i * 12.9898 + 78.233) * 43758.5453).to(dtype)


def _check_deferred(module: nn.Module, obs: torch.Tensor) -> Optional[str]:
    """Why the one-time check of a critic cannot run in this call, else None. It compares numbers:
    while torch.compile or torch.export traces a function there are none yet, and under a
    torch.func transform over the critic's own parameters they are batched. The module's own
    forward runs instead (the same numbers, unfused), and the check waits for an eager call."""
    from torch._subclasses.fake_tensor import is_fake

    if torch.compiler.is_compiling() or is_fake(obs):
        return ("first seen while torch.compile or torch.export traced it: its own forward runs in that graph "
                "(call the op once eagerly beforehand for the fused path)")
    if any(_transformed(p) for p in module.parameters()):
        return "its parameters are transformed (torch.func): its own forward runs"
    return None


def _module_critic(module: nn.Module, activation: Optional[Activation], obs, actions) -> Critic:
    sig = _signature(module, activation)
    reading = _CACHE.get(id(module))
    linears = None
    if reading is not None and reading.signature == sig:
        if reading.linears is None:
            return Critic(module=module, why=reading.why, concat_call=reading.concat_call, reading=reading)
        linears = [ref() for ref in reading.linears]
    if linears is None or any(m is None for m in linears):
        deferred = _check_deferred(module, obs)
        if deferred is not None:  # not remembered: the next eager call checks
            return Critic(module=module, why=deferred)
        reading = _read_and_check(module, activation, obs, actions, sig)
        if reading.linears is None or reading.informative:
            _remember(module, reading)
        if reading.linears is None:
            return Critic(module=module, why=reading.why, concat_call=reading.concat_call, reading=reading)
        linears = [ref() for ref in reading.linears]
    # read now: a parametrized layer's weight is computed from its current parameters
    return Critic(layers=[(m.weight, m.bias) for m in linears], activations=list(reading.activations), module=module)


def module_q(critic: Critic, obs: torch.Tensor, actions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Q (B, K) of an opaque critic module, by its own forward on the B*K (s, a) rows."""
    B, K, A = actions.shape
    params = list(critic.module.parameters())
    pdt = params[0].dtype if params else dtype
    o = obs.unsqueeze(1).expand(B, K, obs.shape[1]).reshape(B * K, obs.shape[1]).to(pdt)
    a = actions.reshape(B * K, A).to(pdt)
    if critic.member is not None:  # one member of a module with stacked_layers(): its forward gives (E, B, K)
        return critic.module(obs.to(pdt), actions.to(pdt))[critic.member].reshape(B, K).to(dtype)
    if critic.concat_call is None:  # first evaluation: find how it is called (kept in the cache)
        critic.concat_call, out = _call_convention(critic.module, o, a)
        if critic.reading is not None:
            critic.reading.concat_call = critic.concat_call
    else:
        out = _call(critic.module, o, a, critic.concat_call)
    return out.reshape(B, K).to(dtype)


def _stacked_module_hooks(module: nn.Module) -> Optional[str]:
    """The hooks on a module read through its stacked_layers() (or any submodule), or None."""
    hooks = _global_hooks()
    if hooks:
        return f"a global {hooks} is registered (torch.nn.modules.module.register_module_*)"
    for path, m in _units(module):
        hooks = _hooks(m)
        if hooks:
            return f"{type(m).__name__}{f' {path!r}' if path else ''} has a {hooks}"
    return None


def _module_name(module: nn.Module, i: int) -> str:
    return f"critic {i} ({type(module).__name__})"


_NORMALISED = ("its layers carry LayerNorms after the hidden activations (misa_fast.nets.StackedLayers.norms), "
               "which the op does not model")


def _normalised_ensemble(critics, stacked, what: str) -> CriticSet:
    """A layer-normalised stacked ensemble: its module's own forward, member by member (the torch
    path runs it, the Triton path refuses it); bare layers have no forward to fall back on."""
    if not isinstance(critics, nn.Module):
        raise CriticArchitectureError(f"{what}: {_NORMALISED}; pass the critic module itself")
    E = stacked[0][0].shape[0]
    return CriticSet([Critic(module=critics, why=_NORMALISED, member=c) for c in range(E)], None,
                     [f"critic {c} of {what}" for c in range(E)])


# ----------------------------------------------------------------------------------------------
def resolve_critics(critics, activation, obs: torch.Tensor, actions: torch.Tensor) -> CriticSet:
    """Read ``critics`` (any form in the module docstring) into a :class:`CriticSet`."""
    act = _explicit(activation)
    # stacked: a module with stacked_layers(), or [(W (E, out, in), b (E, out)), ...]
    stacked = None
    if isinstance(critics, nn.Module) and callable(getattr(critics, "stacked_layers", None)):
        stacked = critics.stacked_layers()
        if act is None and getattr(stacked, "activation", None) is None and getattr(critics, "activation", None):
            act = _explicit(critics.activation)
        what = type(critics).__name__
    elif isinstance(critics, nn.Module):
        raise TypeError("pass a sequence of critics (or a stacked ensemble), not a single module")
    else:
        items = list(critics)
        if items and isinstance(items[0], (tuple, list)) and len(items[0]) == 2 and torch.is_tensor(items[0][0]) \
                and items[0][0].dim() == 3:
            stacked = critics
            what = "stacked critic layers"
    if stacked is not None:
        if getattr(stacked, "norms", None):  # layer-normalised: not the plain MLP the op models
            return _normalised_ensemble(critics, stacked, what)
        spec = _raw_activation(stacked, act, what)
        hooked = _stacked_module_hooks(critics) if isinstance(critics, nn.Module) else None
        if hooked is not None:  # its forward is what the hooks see: run it, member by member
            E = stacked[0][0].shape[0]
            return CriticSet([Critic(module=critics, why=hooked, member=c) for c in range(E)], None,
                             [f"critic {c} of {what}" for c in range(E)])
        stacked = [(w, b) for w, b in stacked]
        if len(stacked) < 2:
            raise ValueError(f"{what}: a critic needs at least two Linear layers, got {len(stacked)}")
        E = stacked[0][0].shape[0]
        per = [Critic(layers=[(w[c], None if b is None else b[c]) for w, b in stacked],
                      activations=[spec] * (len(stacked) - 1)) for c in range(E)]
        return CriticSet(per, stacked, [f"critic {c} of {what}" for c in range(E)])
    out: List[Critic] = []
    names: List[str] = []
    for i, c in enumerate(items):
        if isinstance(c, nn.Linear):
            raise TypeError(f"critic {i} is a single nn.Linear: a critic needs at least two Linear layers")
        if isinstance(c, nn.Module):
            names.append(_module_name(c, i))
            try:
                out.append(_module_critic(c, act, obs, actions))
            except CriticArchitectureError as e:
                raise CriticArchitectureError(f"{names[-1]}: {e}") from None
        else:
            names.append(f"critic {i}")
            if getattr(c, "norms", None):
                raise CriticArchitectureError(f"{names[-1]}: {_NORMALISED}; pass the critic module itself")
            layers = _raw_layers(c, names[-1])
            spec = _raw_activation(c, act, names[-1])
            out.append(Critic(layers=layers, activations=[spec] * (len(layers) - 1)))
    if not out:
        raise ValueError("no critics")
    return CriticSet(out, None, names)


def describe(spec: Sequence[Activation]) -> str:
    return ", ".join(str(a) for a in spec)
