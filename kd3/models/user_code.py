"""Your own ``nn.Module`` as a kd3 teacher or student: ``module.path:factory`` or ``path/to/net.py:factory``.

kd3 calls ``factory(**options)`` (adding ``num_classes`` when the factory takes it, and
``in_channels`` when it names that parameter) and wraps the module in :class:`UserModel`, which
finds the kd3 triple itself: the classifier is the last ``nn.Linear`` whose output is the
network's output, the pooled feature is that layer's input, and the feature map is the output of
the last module whose global average (or max) pool equals the pooled feature. Options
``feature_map`` / ``classifier`` (module names, as in ``named_modules()``) override the guess.

Security: a checkpoint stores the architecture string, and rebuilding it would import and run
that code. kd3 therefore imports user code only while :func:`allow_user_code` names it, which
happens only for what the user wrote in the config (``run.user_code``, ``train.student.arch``) or
on the command line (``import-checkpoint --arch``); anything else is refused before any import.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from kd3.errors import Kd3Error
from kd3.models.base import Kd3Model

#: options kd3 reads itself; every other option is a keyword argument of the factory
RESERVED_OPTIONS = ("feature_map", "classifier", "pool", "input_size")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_SPEC = re.compile(rf"(?P<target>[^:]+\.py|{_IDENT}(?:\.{_IDENT})*):(?P<factory>{_IDENT}(?:\.{_IDENT})*)")

# A context, not a parameter: nested builds (the KD³ student rebuilds its teacher's head) see the
# same permission, and a call site that forgets to grant it refuses instead of importing.
_ALLOWED: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("kd3_allowed_user_code",
                                                                          default=frozenset())


@dataclass(frozen=True)
class UserArch:
    """A parsed ``target:factory``: ``target`` a dotted module or a ``.py`` file."""

    text: str
    target: str
    factory: str

    @property
    def is_file(self) -> bool:
        return self.target.endswith(".py")

    def canonical(self) -> str:
        """Files by absolute path, so ``nets/a.py`` and ``./nets/a.py`` name the same code."""
        target = str(Path(self.target).expanduser().resolve()) if self.is_file else self.target
        return f"{target}:{self.factory}"


def looks_like_user_arch(arch: str) -> bool:
    """True for ``dotted.module:factory`` / ``file.py:factory``; other names (even with a colon, such as
    ``open_clip/hf-hub:…``) are registry names, which never import code."""
    return _SPEC.fullmatch(arch.strip()) is not None


def parse(arch: str) -> UserArch:
    match = _SPEC.fullmatch(arch.strip())
    if match is None:
        raise Kd3Error(f"architecture {arch!r}: expected a registry name (`kd3 models`), 'package.module:factory' "
                       "or 'path/to/file.py:factory'")
    return UserArch(arch.strip(), match["target"], match["factory"])


@contextlib.contextmanager
def allow_user_code(archs: Iterable[str]) -> Iterator[None]:
    """Within this block, the user-code architectures in ``archs`` may be imported (others stay refused).

    Registry names in ``archs`` are ignored, so callers may pass every architecture a config names.
    """
    named = {parse(a).canonical() for a in archs if isinstance(a, str) and looks_like_user_arch(a)}
    token = _ALLOWED.set(_ALLOWED.get() | named)
    try:
        yield
    finally:
        _ALLOWED.reset(token)


def named_archs(options: Any, arch: str | None = None) -> list[str]:
    """``arch`` plus every ``arch`` value nested in ``options`` (a KD³ student names its backbone and teacher)."""
    found = [arch] if arch is not None else []
    if isinstance(options, dict):
        for key, value in options.items():
            if key == "arch" and isinstance(value, str):
                found.append(value)
            else:
                found += named_archs(value)
    elif isinstance(options, list):
        for value in options:
            found += named_archs(value)
    return found


def require_allowed(arch: str, options: Any = None, origin: str | None = None) -> None:
    """Refuse (before importing anything) any user-code architecture in ``arch``/``options`` not named by the user."""
    for name in named_archs(options, arch):
        if not looks_like_user_arch(name):
            continue
        spec = parse(name)
        if spec.canonical() not in _ALLOWED.get():
            where = f"{origin}: " if origin else ""
            raise Kd3Error(f"{where}architecture {name!r} is code outside kd3, and kd3 imports code only when you name "
                           f"it yourself: if you wrote it and trust it, add it to run.user_code in the config (or "
                           f"override run.user_code=['{name}']); import-checkpoint takes it as --arch")


# ------------------------------------------------------------------------------------ the factory
def _load_module(spec: UserArch) -> Any:
    if not spec.is_file:
        try:
            return importlib.import_module(spec.target)
        except ImportError as exc:
            raise Kd3Error(f"architecture {spec.text!r}: cannot import module {spec.target!r} ({exc}); is it on "
                           "PYTHONPATH / installed?") from None
    path = Path(spec.target).expanduser().resolve()
    if not path.is_file():
        raise Kd3Error(f"architecture {spec.text!r}: file not found: {path}")
    # one module per file path, loaded once per process (a rebuild must not re-run the file)
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    name = f"kd3_user_code.{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise Kd3Error(f"architecture {spec.text!r}: {path} is not loadable as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise Kd3Error(f"architecture {spec.text!r}: importing {path} failed: {type(exc).__name__}: {exc}") from None
    return module


def load_factory(arch: str) -> Callable[..., Any]:
    """Resolve ``target:factory`` to the callable; refused unless the user named it (:func:`allow_user_code`)."""
    require_allowed(arch)
    spec = parse(arch)
    obj: Any = _load_module(spec)
    for part in spec.factory.split("."):
        if not hasattr(obj, part):
            raise Kd3Error(f"architecture {arch!r}: {spec.target} has no attribute {spec.factory!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise Kd3Error(f"architecture {arch!r}: {spec.factory!r} is not callable")
    return obj


def _accepts(factory: Callable[..., Any], name: str, via_kwargs: bool) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False
    if name in params and params[name].kind is not inspect.Parameter.POSITIONAL_ONLY:
        return True
    return via_kwargs and any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def build(arch: str, num_classes: int, in_channels: int = 3, image_size: int | None = None,
          **options: Any) -> "UserModel":
    """``factory(**options)`` wrapped as a :class:`UserModel`; ``image_size`` sizes the detection probe."""
    factory = load_factory(arch)
    kwargs = {k: v for k, v in options.items() if k not in RESERVED_OPTIONS}
    if "num_classes" not in kwargs and _accepts(factory, "num_classes", via_kwargs=True):
        kwargs["num_classes"] = num_classes
    if "in_channels" not in kwargs and _accepts(factory, "in_channels", via_kwargs=False):
        kwargs["in_channels"] = in_channels
    try:
        net = factory(**kwargs)
    except Kd3Error:
        raise
    except Exception as exc:
        raise Kd3Error(f"architecture {arch!r}: {parse(arch).factory}(**{kwargs}) failed: "
                       f"{type(exc).__name__}: {exc}") from None
    if not isinstance(net, nn.Module):
        raise Kd3Error(f"architecture {arch!r}: the factory returned a {type(net).__name__}, not a torch.nn.Module")
    probe = int(options.get("input_size") or image_size or 32)
    model = UserModel(net, arch, in_channels, probe, options)
    if model.num_classes != num_classes:
        raise Kd3Error(f"architecture {arch!r}: its classifier {model.classifier_name!r} has {model.num_classes} "
                       f"outputs but {num_classes} classes are expected (let the factory take a num_classes "
                       "argument, or build the net with that many)")
    return model


# ---------------------------------------------------------------------------------- the wrapper
class _Captured(BaseException):
    """Raised by the feature-map hook to stop the forward pass once the map is in hand (a
    BaseException, so a forward with its own ``except Exception`` cannot swallow it)."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value


_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d)


def _first_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]  # (logits, features) as some CIFAR code returns
    return None


def _pool(feature_map: torch.Tensor, kind: str) -> torch.Tensor:
    return feature_map.amax(dim=(2, 3)) if kind == "max" else feature_map.mean(dim=(2, 3))


@dataclass
class _Trace:
    outputs: list[tuple[str, torch.Tensor]]  # 4-D module outputs in completion order
    linear_io: dict[str, tuple[torch.Tensor, torch.Tensor]]  # Linear name → (input, output), last call
    linear_order: list[str]
    calls: dict[str, int]
    logits: torch.Tensor | None


class UserModel(Kd3Model):
    """A user's network split into the kd3 triple; ``net`` is the module as the factory built it.

    ``forward_features`` runs ``net`` up to the feature-map module and stops there; ``pool`` is a
    global average (or max) pool; ``classifier`` is the detected ``nn.Linear``. Layers between the
    pool and the classifier that change nothing in eval mode (Flatten, Dropout) are therefore
    skipped; detection refuses any other layer there (their outputs would differ).
    """

    native_prefix = "net."

    def __init__(self, net: nn.Module, arch: str, in_channels: int, probe_size: int, options: dict[str, Any]):
        super().__init__()
        self.net = net
        self.arch_name = arch
        feature_name, classifier_name = options.get("feature_map"), options.get("classifier")
        pool = options.get("pool")
        if pool not in (None, "avg", "max"):
            raise Kd3Error(f"architecture {arch!r}: option pool must be 'avg' or 'max', got {pool!r}")
        modules = dict(net.named_modules())
        for key, name in (("feature_map", feature_name), ("classifier", classifier_name)):
            if name is not None and (not isinstance(name, str) or name not in modules or not name):
                close = [n for n in modules if n and isinstance(name, str) and name.split(".")[-1] in n][:5]
                raise Kd3Error(f"architecture {arch!r}: option {key}={name!r} names no sub-module"
                               f"{'; did you mean ' + ', '.join(close) + '?' if close else ''}")
        if classifier_name is not None and not isinstance(modules[classifier_name], nn.Linear):
            raise Kd3Error(f"architecture {arch!r}: option classifier={classifier_name!r} is a "
                           f"{type(modules[classifier_name]).__name__}, not an nn.Linear")
        if feature_name is None or classifier_name is None or pool is None:
            feature_name, classifier_name, pool = self._detect(arch, in_channels, probe_size, feature_name,
                                                               classifier_name, pool)
        linear = modules[classifier_name]
        self.feature_name, self.classifier_name, self.pool_kind = feature_name, classifier_name, pool
        self.feature_channels = self.feature_dim = linear.in_features
        self.num_classes = linear.out_features

    @property
    def resolved_options(self) -> dict[str, Any]:
        """The options with the split spelled out: rebuilding from them needs no detection probe."""
        return {"feature_map": self.feature_name, "classifier": self.classifier_name, "pool": self.pool_kind}

    # --------------------------------------------------------------------------------- detection
    def _trace(self, x: torch.Tensor) -> _Trace:
        trace = _Trace([], {}, [], {}, None)
        handles = []

        def hook(name: str, module: nn.Module) -> Callable[..., None]:
            def record(_module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
                trace.calls[name] = trace.calls.get(name, 0) + 1
                # a global pool's own [B, C, 1, 1] output is the pooled feature, never the map
                if isinstance(output, torch.Tensor) and output.dim() == 4 and not (
                        isinstance(module, _POOLS) and output.shape[2:].numel() == 1):
                    trace.outputs.append((name, output))
                if isinstance(module, nn.Linear) and inputs and isinstance(inputs[0], torch.Tensor):
                    trace.linear_io[name] = (inputs[0], output)
                    trace.linear_order.append(name)
            return record

        for name, module in self.net.named_modules():
            if name:
                handles.append(module.register_forward_hook(hook(name, module)))
        was_training = self.net.training
        self.net.eval()
        try:
            with torch.no_grad():
                trace.logits = _first_tensor(self.net(x))
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise Kd3Error(f"architecture {self.arch_name!r}: a probe forward on {tuple(x.shape[1:])} inputs failed: "
                           f"{first} (check the input channels/size; option input_size sets the probe's edge)") \
                from None
        finally:
            for handle in handles:
                handle.remove()
            self.net.train(was_training)
        return trace

    def _detect(self, arch: str, in_channels: int, size: int, feature_name: str | None,
                classifier_name: str | None, pool: str | None) -> tuple[str, str, str]:
        # a private generator: detection must not move the global RNG that fixes initial weights
        x = torch.randn(2, in_channels, size, size, generator=torch.Generator().manual_seed(0))
        x = x.to(next(iter(self.net.parameters()), torch.empty(0)).device)
        trace = self._trace(x)
        override = "; name it with options.classifier (an nn.Linear) and options.feature_map"
        if classifier_name is None:
            if not trace.linear_order:
                raise Kd3Error(f"architecture {arch!r}: no nn.Linear ran in the forward pass, so kd3 finds no "
                               f"classifier (KD³ needs feature map → global pool → linear classifier){override}")
            if trace.logits is None or trace.logits.dim() != 2:
                raise Kd3Error(f"architecture {arch!r}: the forward pass must return logits [B, K] (or a tuple "
                               f"starting with them){override}")
            matches = [n for n in reversed(trace.linear_order) if trace.calls[n] == 1
                       and trace.linear_io[n][1].shape == trace.logits.shape
                       and torch.allclose(trace.linear_io[n][1], trace.logits)]
            if not matches:
                raise Kd3Error(f"architecture {arch!r}: the network's output is not the output of any nn.Linear "
                               f"(last one: {trace.linear_order[-1]!r}){override}")
            classifier_name = matches[0]
        if classifier_name not in trace.linear_io:
            raise Kd3Error(f"architecture {arch!r}: classifier {classifier_name!r} did not run in the forward pass")
        pooled = trace.linear_io[classifier_name][0]
        if pooled.dim() != 2:
            raise Kd3Error(f"architecture {arch!r}: the input of classifier {classifier_name!r} has shape "
                           f"{list(pooled.shape)}, expected a pooled feature [B, D]")
        candidates = [(n, out) for n, out in trace.outputs
                      if (feature_name is None or n == feature_name) and trace.calls.get(n) == 1
                      and out.shape[0] == pooled.shape[0] and out.shape[1] == pooled.shape[1]]
        if feature_name is not None and not candidates:
            raise Kd3Error(f"architecture {arch!r}: option feature_map={feature_name!r} does not give a "
                           f"[B, {pooled.shape[1]}, H, W] map once per forward pass")
        # the latest-finishing module wins (the outermost of nested modules sharing the map), and a
        # real map (H·W > 1) over an already pooled 1x1 one
        ordered = [c for c in reversed(candidates) if c[1].shape[2] * c[1].shape[3] > 1] + \
                  [c for c in reversed(candidates) if c[1].shape[2] * c[1].shape[3] == 1]
        for name, out in ordered:
            for kind in ([pool] if pool else ["avg", "max"]):
                if torch.allclose(_pool(out, kind), pooled, rtol=1e-4, atol=1e-5):
                    return name, classifier_name, kind
        if not trace.outputs:
            reason = "no module gives a 4-D activation [B, C, H, W]"
        else:
            reason = (f"no module's output is a map whose global {pool or 'average/max'} pool equals the "
                      f"{pooled.shape[1]}-d input of classifier {classifier_name!r}")
        raise Kd3Error(f"architecture {arch!r} cannot give KD³ a feature map: {reason}; name the module whose "
                       "output is the last feature map with options.feature_map (and options.pool: avg|max)")

    # ----------------------------------------------------------------------------------- triple
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        def capture(_module: nn.Module, _inputs: Any, output: Any) -> None:
            raise _Captured(output)

        handle = self.net.get_submodule(self.feature_name).register_forward_hook(capture)
        try:
            self.net(x)
        except _Captured as got:
            return got.value
        finally:
            handle.remove()
        raise Kd3Error(f"{self.arch_name}: module {self.feature_name!r} (the feature map) did not run in forward")

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        return _pool(feature_map, self.pool_kind)

    def classifier(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net.get_submodule(self.classifier_name)(pooled)
