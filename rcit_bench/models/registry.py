"""Name -> builder registries for methods, image encoders and text encoders, plus method config loading.

Why: the benchmark spec, the CLI and the tests refer to methods and encoders by name only; one registry
per kind gives a single place that lists what exists and fails with the valid names (and a "did you
mean") instead of a bare KeyError. Method modules register themselves with :func:`register_method`; the
built-in ones are imported lazily on first lookup so that importing the registry stays cheap and no
import cycle arises (methods import the registry, not the reverse).

Encoder names may carry an argument after a colon, ``"timm:resnet152"`` or
``"transformer:path/to/model"``: the part before the colon selects the registered family, the rest is
passed to its builder as ``spec``.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

from rcit_bench.errors import UserError
from rcit_bench.utils import did_you_mean

T = TypeVar("T")

# Modules that register the built-in methods; imported on first lookup. Every one must exist: a missing
# module (a typo here, a renamed file) is an error naming it, never a method that silently disappears.
# A new method file registers itself with @register_method and is added here.
_BUILTIN_METHOD_MODULES = (
    "rcit_bench.models.vsepp",
    "rcit_bench.models.rcit",
    "rcit_bench.models.miie",
    "rcit_bench.models.matchmap",
    "rcit_bench.models.vsrpp",
    "rcit_bench.models.hf_dual",
    "rcit_bench.models.open_clip_model",
)
_BUILTIN_ENCODER_MODULES = ("rcit_bench.models.encoders",)

_METHODS: dict[str, type] = {}
_TINY_CONFIGS: dict[str, dict[str, Any]] = {}
_IMAGE_ENCODERS: dict[str, Callable[..., Any]] = {}
_TEXT_ENCODERS: dict[str, Callable[..., Any]] = {}
_loaded_methods = False
_loaded_encoders = False

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _import_builtin(module: str) -> None:
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module:  # a dependency of the module is missing: its own message says which
            raise
        raise ModuleNotFoundError(
            f"Built-in method module {module!r} (listed in rcit_bench.models.registry._BUILTIN_METHOD_MODULES) "
            f"does not exist; fix the name in that list or add the module.", name=module
        ) from err


def _ensure_methods() -> None:
    global _loaded_methods
    if not _loaded_methods:
        _loaded_methods = True  # before the imports: a method module may look the registry up while loading
        try:
            for module in _BUILTIN_METHOD_MODULES:
                _import_builtin(module)
        except BaseException:
            _loaded_methods = False  # the next lookup fails the same way instead of seeing a partial registry
            raise


def _ensure_encoders() -> None:
    global _loaded_encoders
    if not _loaded_encoders:
        _loaded_encoders = True
        for module in _BUILTIN_ENCODER_MODULES:
            importlib.import_module(module)


def _unknown(kind: str, arg: str, name: str, choices: list[str], hint: str = "") -> ValueError:
    listed = ", ".join(f"'{c}'" for c in choices) or "(none registered)"
    return UserError(
        f"Unknown {kind} {name!r} for argument `{arg}`; registered: {listed}.{did_you_mean(name, choices)}{hint}"
    )


# --------------------------------------------------------------------------------------------- methods
def register_method(name: str, *, tiny_config: dict[str, Any] | None = None) -> Callable[[type[T]], type[T]]:
    """Class decorator registering a :class:`RetrievalModule` subclass under `name`.

    `tiny_config` is a small constructor config (CPU, a few seconds) used by the registry-parametrised
    test; it is exposed as ``TINY_CONFIGS[name]``.
    """

    def deco(cls: type[T]) -> type[T]:
        if name in _METHODS and _METHODS[name] is not cls:
            raise UserError(f"Method {name!r} is already registered by {_METHODS[name].__qualname__}.")
        _METHODS[name] = cls
        cls.method_name = name  # type: ignore[attr-defined]
        if tiny_config is not None:
            _TINY_CONFIGS[name] = dict(tiny_config)
        return cls

    return deco


#: Python entry point group through which an installed package offers methods (name -> ``module:Class``)
ENTRY_POINT_GROUP = "rcit_bench.methods"


def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def list_methods() -> list[str]:
    """Sorted names of all registered methods (built-ins are imported first) and of the installed plugins'
    methods (entry point group ``rcit_bench.methods``, not imported until used)."""
    _ensure_methods()
    return sorted(set(_METHODS) | set(_entry_points()))


def _check_method_class(obj: Any, name: str, origin: str) -> type:
    from rcit_bench.models.base import RetrievalModule

    if not (isinstance(obj, type) and issubclass(obj, RetrievalModule)):
        what = type(obj).__name__ if not isinstance(obj, type) else f"class {obj.__qualname__}"
        raise UserError(f"Method {name!r} ({origin}) is a {what}, not a subclass of "
                        f"rcit_bench.models.base.RetrievalModule; a method subclasses it (see the README, \"Evaluate "
                        f"your own model\").")
    if "method_name" not in vars(obj):  # errors and logs name the method as the spec does
        obj.method_name = name
    _METHODS[name] = obj
    return obj


def _import_user_method(name: str) -> type:
    """``package.module:Class`` -> that class, imported from the user's code (on the Python path)."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr or ":" in attr:
        raise UserError(f"Method {name!r}: write a user's method as 'package.module:ClassName'.")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise UserError(f"Method {name!r}: module {module_name!r} not found (no {err.name!r} on the Python "
                            f"path); run from the folder that holds it, put it on PYTHONPATH, or install it.") from None
        raise UserError(f"Method {name!r}: importing module {module_name!r} failed: {type(err).__name__}: {err} "
                        f"(a dependency of that module is missing).") from err
    except Exception as err:  # the user's module raised while importing: say so, with its own error
        raise UserError(f"Method {name!r}: importing module {module_name!r} failed: {type(err).__name__}: "
                        f"{err}.") from err
    if not hasattr(module, attr):
        from rcit_bench.models.base import RetrievalModule

        found = sorted(k for k, v in vars(module).items()
                       if isinstance(v, type) and issubclass(v, RetrievalModule) and v is not RetrievalModule)
        listed = ", ".join(repr(k) for k in found) or "none"
        raise UserError(f"Method {name!r}: module {module_name!r} has no {attr!r} (its RetrievalModule classes: "
                        f"{listed}).{did_you_mean(attr, found)}")
    return _check_method_class(getattr(module, attr), name, f"from module {module_name!r}")


def get_method_class(name: str) -> type:
    """The class of method `name`: a registered name, an installed plugin's name (entry point group
    ``rcit_bench.methods``), or ``package.module:ClassName`` in the user's code; a UserError saying why not."""
    _ensure_methods()
    if name in _METHODS:
        return _METHODS[name]
    if ":" in str(name):
        return _import_user_method(str(name))
    ep = _entry_points().get(name)
    if ep is not None:
        try:
            obj = ep.load()
        except Exception as err:
            raise UserError(f"Method {name!r}: the plugin's entry point ({ENTRY_POINT_GROUP}: {ep.value}) failed to "
                            f"load: {type(err).__name__}: {err}.") from err
        return _check_method_class(obj, name, f"entry point {ep.value!r}")
    raise _unknown("method", "method", name, list_methods(), " A method in your own code: 'package.module:ClassName'.")


def build_method(name: str, **config: Any) -> Any:
    """Instantiate method `name`.

    `config` is either flat constructor kwargs (``embed_dim=..., lr=...``) or a method config with
    ``model`` / ``optim`` sections (as returned by :func:`load_method_config`); sections are flattened,
    ``data`` is recorded as ``data_config`` hyper-parameter for provenance; ``trainer``, ``method``,
    ``description`` are ignored here (the runner uses them).
    """
    cls = get_method_class(name)
    return cls(**flatten_method_config(config))


def flatten_method_config(config: dict[str, Any]) -> dict[str, Any]:
    """Turn ``{method, model: {...}, optim: {...}, trainer, data}`` into constructor kwargs."""
    config = dict(config)
    flat: dict[str, Any] = {}
    for section in ("model", "optim"):
        sub = config.pop(section, None)
        if sub is not None:
            if not isinstance(sub, dict):
                raise UserError(f"Config section `{section}` must be a mapping, but got {type(sub).__name__}.")
            flat.update(sub)
    data = config.pop("data", None)
    config.pop("trainer", None)
    config.pop("method", None)
    config.pop("description", None)
    flat.update(config)  # explicit flat kwargs override the sections
    if data is not None and "data_config" not in flat:
        flat["data_config"] = data
    return flat


def __getattr__(attr: str) -> Any:
    # TINY_CONFIGS is resolved lazily so that methods registered in other modules are included.
    if attr == "TINY_CONFIGS":
        _ensure_methods()
        return _TINY_CONFIGS
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def tiny_config(name: str) -> dict[str, Any]:
    """A deep copy of the tiny test config of method `name`."""
    _ensure_methods()
    if name not in _TINY_CONFIGS:
        raise _unknown("tiny config", "name", name, sorted(_TINY_CONFIGS))
    return copy.deepcopy(_TINY_CONFIGS[name])


# --------------------------------------------------------------------------------------------- configs
def list_method_configs() -> list[str]:
    """Names of the packaged default configs (``rcit_bench/configs/<name>.yaml``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_method_config(name_or_path: str | Path) -> dict[str, Any]:
    """Load a method config: a packaged name (``'vsepp'``, ``'paper/vsepp_coco'``) or a YAML file path.

    Returns ``{method, model: {...}, optim: {...}, trainer: {...}, data: {...}}`` with missing
    sections filled with empty dicts.
    """
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith((".yaml", ".yml")) or path.exists()):
        path = CONFIG_DIR / f"{text}.yaml"
        if not path.exists():
            choices = list_method_configs() + [f"paper/{p.stem}" for p in (CONFIG_DIR / "paper").glob("*.yaml")]
            raise _unknown("method config", "name_or_path", text, sorted(choices))
    if not path.exists():
        raise FileNotFoundError(f"Method config file {str(path)!r} (argument `name_or_path`) does not exist.")
    cfg = yaml.safe_load(path.read_text()) or {}
    if not isinstance(cfg, dict) or "method" not in cfg:
        raise UserError(f"Method config {str(path)!r} must be a mapping with a `method` key.")
    allowed = {"method", "model", "optim", "trainer", "data", "description"}
    extra = sorted(set(cfg) - allowed)
    if extra:
        raise UserError(
            f"Method config {str(path)!r} has unknown top-level keys {extra}; allowed: {sorted(allowed)}."
        )
    for section in ("model", "optim", "trainer", "data"):
        cfg.setdefault(section, {})
        if cfg[section] is None:
            cfg[section] = {}
    return cfg


# --------------------------------------------------------------------------------------------- encoders
def register_image_encoder(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register an image encoder builder ``fn(spec: str | None, embed_dim: int, **kw) -> ImageEncoder``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _IMAGE_ENCODERS[name] = fn
        return fn

    return deco


def register_text_encoder(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a text encoder builder ``fn(spec: str | None, embed_dim: int, **kw) -> TextEncoder``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _TEXT_ENCODERS[name] = fn
        return fn

    return deco


def list_image_encoders() -> list[str]:
    """Registered image encoder families (``timm`` takes ``timm:<model name>``)."""
    _ensure_encoders()
    return sorted(_IMAGE_ENCODERS)


def list_text_encoders() -> list[str]:
    """Registered text encoder families (``transformer`` takes ``transformer:<path or name>``)."""
    _ensure_encoders()
    return sorted(_TEXT_ENCODERS)


#: Encoder builder arguments the method passes itself (from its own arguments), so an encoder mapping may not.
SET_BY_METHOD: dict[str, tuple[str, ...]] = {"image_encoder": ("embed_dim",), "text_encoder": ("embed_dim", "vocab_size")}


def check_encoder_arguments(arg: str, name: str, builder: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Every keyword in `kwargs` is a parameter of the registered `builder` of encoder `name`, checked on its
    signature before it is called (a TypeError raised inside a builder stays a TypeError: that is a bug).
    Otherwise a UserError naming the argument (``image_encoder`` / ``text_encoder``), the bad key, the keys the
    encoder takes and a "did you mean". A builder taking ``**kwargs`` accepts anything."""
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # no signature to read (a C callable): let the call decide
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    takes = [n for n, p in params.items()
             if n != "spec" and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    unknown = [k for k in kwargs if k not in takes]
    if unknown:
        shown = [n for n in takes if n not in SET_BY_METHOD.get(arg, ())]
        listed = ", ".join(f"'{n}'" for n in shown) or "no keys besides `name`"
        raise UserError(
            f"Argument `{arg}`: encoder {name!r} does not take {', '.join(repr(k) for k in unknown)}; it takes "
            f"`name` and {listed}.{did_you_mean(str(unknown[0]), ['name', *shown])}"
        )


def check_encoder(arg: str, cfg: Any) -> None:
    """What building encoder config `cfg` (``'gru'`` or ``{name: ..., **kwargs}``) for argument `arg`
    (``image_encoder`` / ``text_encoder``) would refuse, checked without building it: the mapping, the
    registered name and the keyword arguments. A UserError naming them, e.g. for a check before training."""
    from rcit_bench.models.base import encoder_config

    _ensure_encoders()
    name, kwargs = encoder_config(cfg, arg)
    family, _ = _split_name(name)
    registry = _IMAGE_ENCODERS if arg == "image_encoder" else _TEXT_ENCODERS
    if family not in registry:
        kind = "image encoder" if arg == "image_encoder" else "text encoder"
        raise _unknown(kind, arg, name, sorted(registry))
    check_encoder_arguments(arg, name, registry[family], kwargs)


def _split_name(name: str) -> tuple[str, str | None]:
    family, sep, spec = str(name).partition(":")
    return family, (spec if sep else None)


def build_image_encoder(name: str, **kwargs: Any) -> Any:
    """Build image encoder `name` (e.g. ``'small_cnn'``, ``'timm:resnet152'``)."""
    _ensure_encoders()
    family, spec = _split_name(name)
    if family not in _IMAGE_ENCODERS:
        raise _unknown("image encoder", "image_encoder", name, sorted(_IMAGE_ENCODERS),
                       " Use 'timm:<timm model name>' for any timm backbone.")
    check_encoder_arguments("image_encoder", name, _IMAGE_ENCODERS[family], kwargs)
    return _IMAGE_ENCODERS[family](spec, **kwargs)


def build_text_encoder(name: str, **kwargs: Any) -> Any:
    """Build text encoder `name` (``'gru'``, ``'bigru'``, ``'transformer:<local path>'``)."""
    _ensure_encoders()
    family, spec = _split_name(name)
    if family not in _TEXT_ENCODERS:
        raise _unknown("text encoder", "text_encoder", name, sorted(_TEXT_ENCODERS),
                       " Use 'transformer:<local path or hub name>' for a Hugging Face model.")
    check_encoder_arguments("text_encoder", name, _TEXT_ENCODERS[family], kwargs)
    return _TEXT_ENCODERS[family](spec, **kwargs)
