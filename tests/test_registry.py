"""The method registry: exactly the built-in methods (five trained, two zero-shot), every registering module listed, a missing one loud."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import rcit_bench.models.registry as registry

EXPECTED_METHODS = {"vsepp", "rcit", "miie", "matchmap", "vsrpp", "hf_dual_encoder", "open_clip"}  # not read


def test_registry_holds_exactly_the_built_in_methods() -> None:
    assert set(registry.list_methods()) == EXPECTED_METHODS


def test_every_registering_module_is_listed() -> None:
    """A method file that registers itself but is missing from _BUILTIN_METHOD_MODULES would only be found when
    something else imported it; read the files instead of trusting the list."""
    models_dir = Path(registry.__file__).parent
    registering = {
        f"rcit_bench.models.{path.stem}"
        for path in models_dir.glob("*.py")
        if path.name != "registry.py" and re.search(r"^@register_method\(", path.read_text(), re.MULTILINE)
    }
    assert len(registering) == len(EXPECTED_METHODS)  # one file per method
    assert registering == set(registry._BUILTIN_METHOD_MODULES)


def test_typo_in_builtin_modules_raises_naming_the_module(monkeypatch) -> None:  # noqa: ANN001
    typo = "rcit_bench.models.vsepq"
    monkeypatch.setattr(registry, "_BUILTIN_METHOD_MODULES", (*registry._BUILTIN_METHOD_MODULES, typo))
    monkeypatch.setattr(registry, "_loaded_methods", False)
    with pytest.raises(ModuleNotFoundError, match=re.escape(repr(typo))):
        registry.list_methods()
    # not marked as loaded: the next lookup fails the same way instead of working on a partial registry
    assert registry._loaded_methods is False
    with pytest.raises(ModuleNotFoundError, match="_BUILTIN_METHOD_MODULES"):
        registry.get_method_class("vsepp")


def test_missing_dependency_of_a_method_module_is_not_renamed(monkeypatch, tmp_path) -> None:  # noqa: ANN001
    """A module that exists but imports something missing keeps the original error (naming the dependency)."""
    (tmp_path / "broken_method_mod.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_BUILTIN_METHOD_MODULES", ("broken_method_mod",))
    monkeypatch.setattr(registry, "_loaded_methods", False)
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz") as info:
        registry.list_methods()
    assert info.value.name == "no_such_dependency_xyz"
