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


def _app_imports(path) -> set[str]:
    """The ``app.*`` modules a file imports (type-checking-only imports included: they are dependencies too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module == "app" and node.level == 0:
            names.update(f"app.{alias.name}" for alias in node.names)  # from app import migrate
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("app."):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("app"))
    return names


# What the gallery package stands on: the store, the index and the failures, nothing that serves HTTP.
GALLERY_FLOOR = {"app.columns", "app.db", "app.faults", "app.index", "app.migrate", "app.replication", "app.config"}


def test_the_gallery_sits_below_everything_that_calls_it():
    for path in (REPO_ROOT / "app" / "gallery").glob("*.py"):
        above = {m for m in _app_imports(path) if not m.startswith("app.gallery")} - GALLERY_FLOOR
        assert not above, f"{path.name} imports {sorted(above)}, which the gallery does not stand on"
    for module in GALLERY_FLOOR:
        path = REPO_ROOT / (module.replace(".", "/") + ".py")
        assert not {m for m in _app_imports(path) if m.startswith("app.gallery")}, f"{module} imports the gallery"


def test_errors_and_images_do_not_import_the_gallery():
    for name in ("errors.py", "images.py"):
        assert not {m for m in _app_imports(REPO_ROOT / "app" / name) if m.startswith("app.gallery")}, name
