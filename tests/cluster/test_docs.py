"""docs/architecture.md and cluster/README.md stay true to the code: every file they name
exists, every `path:Name` is defined in that file, the metrics and KV backends they list are
the ones the code has, and the README's links resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import REPO_ROOT

from deployments.config import KV_TRANSPORTS
from disagg.transport.direct import INPROCESS

DOCS = [REPO_ROOT / "docs" / "architecture.md", REPO_ROOT / "cluster" / "README.md"]
_CODE = re.compile(r"`([^`\s]+)`")
_PATH = re.compile(r"(?:[\w.-]+/)+(?:[\w.-]+\.(?:py|yaml|json|md)|Dockerfile)?(?::(\w+))?")


def _references(doc: Path) -> list[tuple[Path, str | None, str]]:
    refs = []
    for span in _CODE.findall(doc.read_text()):
        match = _PATH.fullmatch(span)
        if match is None or span.startswith("/"):
            continue
        path, name = span.split(":")[0], match.group(1)
        local = doc.parent / path
        refs.append((local if local.exists() else REPO_ROOT / path, name, span))
    return refs


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.relative_to(REPO_ROOT).as_posix())
def test_every_named_file_and_definition_exists(doc):
    refs = _references(doc)
    assert len(refs) > 10  # the pattern still finds the references
    for path, name, span in refs:
        assert path.exists(), f"{doc.name} names {span!r}, which does not exist"
        if name is not None:
            defined = re.search(rf"^\s*(?:async def|def|class)\s+{name}\b|^{name}\s*[:=]",
                                path.read_text(), re.MULTILINE)
            assert defined, f"{doc.name} names {span!r}: {path.name} defines no {name}"


def test_the_listed_metrics_are_the_ones_the_code_exports():
    code = set(re.findall(r'"(disagg_\w+)"', (REPO_ROOT / "deployments" / "metrics.py")
                          .read_text()))
    text = DOCS[0].read_text()
    documented = set(re.findall(r"`(disagg_\w+)", text[text.index("## 7. Metrics"):]))
    assert documented == code


def test_every_kv_backend_is_described():
    text = DOCS[0].read_text()
    for backend in (INPROCESS, *KV_TRANSPORTS):
        assert f"`{backend}`" in text, backend


def test_readme_links_resolve():
    for doc in (REPO_ROOT / "README.md", *DOCS):
        for target in re.findall(r"\]\(([^)#]+)\)", doc.read_text()):
            if "://" not in target:
                assert (doc.parent / target).exists(), f"{doc.name} links {target}"
