"""Methods from the user's own code: `method: module:ClassName` (next to the spec or on the path) and installed
plugins (entry point group `rcit_bench.methods`), with no edit of this package. The README's example of
"Evaluate your own model" is copied out of README.md and run as written; the ways a user's method can be wrong
each give one error naming the spec key and the cause."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from rcit_bench.bench import runner
from rcit_bench.bench.spec import validate_spec
from rcit_bench.errors import UserError
from rcit_bench.models import registry

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- file: (?P<name>[\w.]+) -->\n```\w+\n(?P<body>.*?)```", re.S)


def readme_files() -> dict[str, str]:
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Evaluate your own model", 1)[1]
    return {m["name"]: m["body"] for m in BLOCK.finditer(section.split("\n## ", 1)[0])}


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    """The user's modules and classes are gone after the test: the path, the imported modules, the registry."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    registry.list_methods()  # the built-ins first, so that the copy holds them and the original stays whole
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith(("pooled_mlp", "um_", "plugin_")):
            del sys.modules[name]


def test_the_readme_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated: None,
                                            one_thread: None) -> None:
    files = readme_files()
    assert set(files) == {"pooled_mlp.py", "pooled_mlp.yaml", "mine.yaml"}
    assert len(files["pooled_mlp.py"].splitlines()) <= 35
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    monkeypatch.chdir(tmp_path)  # as the README says: run from the folder with the three files
    summary = runner.run_spec(tmp_path / "mine.yaml", results_dir=tmp_path / "runs", use_wandb=False,
                              leaderboard_dir=tmp_path / "board", live=False)
    assert summary.failed == 0 and summary.evaluated == 3 and summary.trained == ["pooled/seed0"]
    cls = registry.get_method_class("pooled_mlp:PooledMLP")
    assert cls.__module__ == "pooled_mlp" and Path(sys.modules["pooled_mlp"].__file__).parent == tmp_path
    folder = tmp_path / "runs" / "mine" / "pooled" / "seed0"
    clean = json.loads((folder / "clean.json").read_text())
    assert clean["entry"]["method"] == "pooled_mlp:PooledMLP" and clean["training"]["optimizer_steps"] > 0
    assert clean["config"]["model"]["hidden"] == 64  # the config next to the spec was used
    assert list((folder / "checkpoints").glob("*.ckpt"))  # trained and checkpointed like a built-in method
    assert "pooled_mlp:PooledMLP" in (tmp_path / "board" / "README.md").read_text()


def _spec(method: str, config: str | None = "m.yaml") -> dict:
    entry = {"id": "m", "method": method}
    if config:
        entry["config"] = config
    return {"name": "u", "dataset": {"kind": "synthetic", "options": {"root": "data"}}, "entries": [entry],
            "evaluation": {"clean": True}}


def _validate(tmp_path: Path, method: str, module_code: dict[str, str] | None = None, config: bool = True) -> None:
    for name, code in (module_code or {}).items():
        (tmp_path / f"{name}.py").write_text(code)
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"method": method, "model": {}}))
    validate_spec(_spec(method, "m.yaml" if config else None), tmp_path / "spec.yaml")


def test_an_unknown_module(tmp_path: Path, isolated: None) -> None:
    with pytest.raises(UserError, match=r"`entries\[0\]\.method`: Method 'um_nowhere:Thing': module 'um_nowhere' "
                                        r"not found .*PYTHONPATH"):
        _validate(tmp_path, "um_nowhere:Thing")


def test_a_missing_class(tmp_path: Path, isolated: None) -> None:
    code = "from rcit_bench.models.base import RetrievalModule\n\nclass PooledThing(RetrievalModule):\n    pass\n"
    with pytest.raises(UserError, match=r"`entries\[0\]\.method`: .*module 'um_missing' has no 'PooledThin' \(its "
                                        r"RetrievalModule classes: 'PooledThing'\).*Did you mean"):
        _validate(tmp_path, "um_missing:PooledThin", {"um_missing": code})


def test_a_class_that_is_not_a_retrieval_module(tmp_path: Path, isolated: None) -> None:
    code = "import torch\n\nclass Net(torch.nn.Module):\n    pass\n"
    with pytest.raises(UserError, match=r"`entries\[0\]\.method`: Method 'um_plain:Net' .* is a class Net, not a "
                                        r"subclass of rcit_bench\.models\.base\.RetrievalModule"):
        _validate(tmp_path, "um_plain:Net", {"um_plain": code})


def test_a_module_that_fails_to_import(tmp_path: Path, isolated: None) -> None:
    with pytest.raises(UserError, match=r"`entries\[0\]\.method`: .*importing module 'um_broken' failed: "
                                        r"ZeroDivisionError: division by zero"):
        _validate(tmp_path, "um_broken:Anything", {"um_broken": "x = 1 / 0\n"})
    with pytest.raises(UserError, match=r"importing module 'um_needs' failed: ModuleNotFoundError.*a dependency"):
        _validate(tmp_path, "um_needs:Anything", {"um_needs": "import um_not_installed_anywhere\n"})


def test_a_user_method_needs_its_config(tmp_path: Path, isolated: None) -> None:
    code = "from rcit_bench.models.base import RetrievalModule\n\nclass Mine(RetrievalModule):\n    pass\n"
    with pytest.raises(UserError, match=r"`entries\[0\]\.config` is required for a method in your own code"):
        _validate(tmp_path, "um_noconf:Mine", {"um_noconf": code}, config=False)


def test_declared_needs_are_read_from_the_user_class(tmp_path: Path, isolated: None) -> None:
    """A user's class that trains on (clean, corrupted) pairs gets the same rule as RCIT, from its attribute."""
    code = ("from rcit_bench.models.base import RetrievalModule\n\n"
            "class Twin(RetrievalModule):\n    needs_paired_views = True\n")
    with pytest.raises(UserError, match=r"entries\[0\]\.regime.*'um_twin:Twin' trains on \(clean, corrupted\) pairs"):
        _validate(tmp_path, "um_twin:Twin", {"um_twin": code})


def test_an_installed_plugin_by_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated: None) -> None:
    """A package installed with an entry point in group rcit_bench.methods (a dist-info folder on the path, as pip
    writes it) is listed and used by its name."""
    (tmp_path / "plugin_pkg.py").write_text(
        "from rcit_bench.models.base import RetrievalModule\n\nclass Offered(RetrievalModule):\n    localizes = False\n")
    info = tmp_path / "plugin_pkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: plugin-pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[rcit_bench.methods]\noffered = plugin_pkg:Offered\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "offered" in registry.list_methods()
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"method": "offered", "model": {}}))
    spec = validate_spec(_spec("offered"), tmp_path / "spec.yaml")
    assert spec.entries[0].method == "offered" and registry.get_method_class("offered").__name__ == "Offered"
