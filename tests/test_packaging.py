"""The wheel must ship every subpackage: an editable install hides a missing one."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_in_pyproject():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    found = set()
    for name, folder in setup["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *parts)))
    missing = sorted(found - listed)
    assert not missing, f"packages missing from pyproject.toml: {missing}"


def test_every_data_file_is_shipped():
    """Files beside the code that it reads at run time (JSON tables, facts) must match the
    package-data patterns, or an installed (not editable) ndb lacks them."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setup["package-data"]
    missing = []
    for package, folder in setup["package-dir"].items():
        for path in (ROOT / folder).rglob("*"):
            if path.suffix not in (".json", ".jsonl") or "__pycache__" in path.parts:
                continue
            relative = path.relative_to(ROOT / folder)
            owner = ".".join((package, *relative.parent.parts))
            # the nearest listed package above the file, with the file's path inside it
            while owner not in patterns and "." in owner:
                owner = owner.rsplit(".", 1)[0]
            inside = path.relative_to(ROOT / folder / Path(*owner.split(".")[1:]))
            if not any(inside.match(p) for p in patterns.get(owner, [])):
                missing.append(str(path.relative_to(ROOT)))
    assert not missing, f"data files no package-data pattern ships: {missing}"
