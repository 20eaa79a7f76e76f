"""Packaging: every package is listed, our kernels never shadow Hugging Face's `kernels`,
and imports go one way (kernels <- disagg <- deployments <- cluster)."""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.metadata
import subprocess
import sys
import tomllib

import pytest
from helpers import REPO_ROOT

LAYERS = ["disagg_kernels", "disagg", "deployments", "cluster"]
FOLDER_OF = {"disagg_kernels": "kernels", "disagg": "disagg", "deployments": "deployments",
             "cluster": "cluster"}


def _pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed_in_pyproject():
    setuptools_cfg = _pyproject()["tool"]["setuptools"]
    listed = set(setuptools_cfg["packages"])
    mapping = {v: k for k, v in setuptools_cfg["package-dir"].items()}
    found = set()
    for top in ("disagg", "kernels", "deployments"):
        root = REPO_ROOT / top
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(REPO_ROOT).parts
            found.add(".".join((mapping.get(rel[0], rel[0]),) + rel[1:]))
    found.add("disagg_kernels")
    assert found <= listed, f"unlisted packages: {sorted(found - listed)}"


def test_our_kernels_folder_is_not_importable_as_kernels():
    # A regular package here would win over an installed `kernels` when the repository root is
    # on sys.path (python -m ...). A bare folder is only a namespace candidate, which loses.
    assert not (REPO_ROOT / "kernels" / "__init__.py").exists()
    spec = importlib.machinery.PathFinder.find_spec("kernels", [str(REPO_ROOT)])
    assert spec is not None and spec.origin is None  # namespace portion only


def test_transformers_detects_hugging_face_kernels_from_the_repo_root():
    version = importlib.metadata.version("kernels")  # Hugging Face's, from the dev extra
    probe = (
        "import kernels, transformers.utils.import_utils as iu; "
        "print(kernels.__file__); print(iu._is_package_available('kernels', return_version=True)); "
        "from kernels import get_kernel; import disagg_kernels; print(list(disagg_kernels.__path__))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=120, check=True).stdout.splitlines()
    assert "site-packages" in out[0] and not out[0].startswith(str(REPO_ROOT / "kernels"))
    assert out[1] == str((True, version))
    assert str(REPO_ROOT / "kernels") in out[2]


def _imported_top_levels(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_go_one_way(layer):
    forbidden = set(LAYERS[LAYERS.index(layer) + 1:])
    folder = REPO_ROOT / FOLDER_OF[layer]
    for path in folder.rglob("*.py"):
        bad = _imported_top_levels(path) & forbidden
        assert not bad, f"{path.relative_to(REPO_ROOT)} imports {sorted(bad)}"
        if layer == "disagg_kernels":
            assert "ray" not in _imported_top_levels(path)


def test_ray_appears_in_the_engine_only_inside_transports():
    for path in (REPO_ROOT / "disagg").rglob("*.py"):
        if "transport" in path.parts:
            continue
        assert "ray" not in _imported_top_levels(path), path
