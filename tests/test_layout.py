"""The architecture the layout promises: app/ serves models/ and never imports training/."""

from __future__ import annotations

import ast

from tests.conftest import REPO_ROOT


def _imported_top_levels(package: str) -> set[str]:
    names: set[str] = set()
    for path in (REPO_ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_app_does_not_import_training():
    assert "training" not in _imported_top_levels("app")


def test_models_imports_no_service_or_dataset_code():
    assert not _imported_top_levels("models") & {"app", "training", "fastapi", "faiss", "sqlalchemy"}


def test_ci_runs_exactly_the_readmes_test_command():
    readme = (REPO_ROOT / "README.md").read_text()
    ci_lines = [line for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert len(ci_lines) == 1
    assert f"```bash\n{ci_lines[0]}\n```" in readme
