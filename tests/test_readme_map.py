"""The README's map from the papers to the code cannot rot: every `file.py:name` it names exists, and every
file and docs page it links to is there."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
NAMED = sorted(set(re.findall(r"`([\w/]+\.py):([\w.]+)`", README)))  # (file, dotted name)


def defined(path, dotted):
    """Whether `dotted` (a function, class, method or constant) is defined at the top level of path."""
    scope = ast.parse(path.read_text()).body
    for part in dotted.split("."):
        found = None
        for node in scope:
            targets = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else []
            if isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = [t.id for t in getattr(node, "targets", [getattr(node, "target", None)]) if hasattr(t, "id")]
            if part in targets:
                found = node
        if found is None:
            return False
        scope = getattr(found, "body", [])
    return True


def test_the_map_names_enough_places():
    assert len(NAMED) >= 30, NAMED  # one row per equation or concept of both papers and the baselines


@pytest.mark.parametrize("file,name", NAMED, ids=[f"{f}:{n}" for f, n in NAMED])
def test_every_place_the_readme_names_exists(file, name):
    path = ROOT / file
    assert path.is_file(), f"README names {file}, which does not exist"
    assert defined(path, name), f"README names {file}:{name}, which {file} does not define"


def test_every_linked_file_exists():
    links = re.findall(r"\]\(((?:docs|assets|data)/[^)#\s]+)", README)
    assert links, "the README links its docs pages"
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, missing


def test_a_wrong_name_is_caught(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("class A:\n    def f(self):\n        pass\n\nX = 1\n")
    assert defined(module, "A.f") and defined(module, "X")
    assert not defined(module, "A.g") and not defined(module, "B")
