"""The house keeps its layout (README, "Architecture"; docs/service.md): a replica's code in
rooms by concern whose imports run one way, and no module longer than one read."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVICE = ROOT / "service"
CODE = ("service", "balancer", "localcluster", "loadtest", "scripts", "tests")

# Each room of service/ and the rooms it may import from: only downward. The front door
# (app.py and the gunicorn side) assembles everything; the floor imports nothing above it.
FLOOR = 0
RANKS = {"settings": 0, "errors": 0, "metrics": 0, "inputs": 1, "cache": 2, "models": 3, "dataplane": 4, "web": 5}
FRONT_DOOR = 6


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _rank(module: str) -> int:
    """service.web.fastlane -> the web room's rank; service.app -> the front door's."""
    parts = module.split(".")
    if len(parts) == 1:
        return FLOOR  # service/__init__.py: the version
    return RANKS.get(parts[1], FRONT_DOOR)


def _imports(path: Path) -> set[str]:
    """The service modules `path` imports at run time (not those under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "service":
            for alias in node.names:  # `from service.web import envelope` names a module
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if _is_module(candidate) else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "service")
    return found


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    return {
        _module_name(path): _imports(path) for path in sorted(SERVICE.rglob("*.py")) if path.name != "gunicorn.conf.py"
    }


def test_the_service_root_holds_the_front_door_and_the_floor_only():
    root_modules = sorted(path.name for path in SERVICE.glob("*.py"))
    assert len(root_modules) <= 8, root_modules
    rooms = sorted(path.name for path in SERVICE.iterdir() if (path / "__init__.py").is_file())
    assert rooms == ["cache", "dataplane", "inputs", "models", "settings", "web"]


def test_no_import_runs_back_up_through_the_rooms():
    """web -> dataplane -> models -> cache -> inputs -> the floor (settings, errors, metrics)."""
    upward = [
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in targets
        if _rank(target) > _rank(module)
    ]
    assert upward == []


def test_the_data_plane_knows_nothing_of_http():
    for module, targets in _graph().items():
        if module.startswith(("service.dataplane", "service.models", "service.cache", "service.inputs")):
            assert not any(t.startswith("service.web") for t in targets), module
            source = ROOT.joinpath(*module.split(".")).with_suffix(".py")
            if source.is_file():
                assert "import flask" not in source.read_text().lower(), module


def test_the_service_modules_import_each_other_without_a_cycle():
    graph = _graph()
    state: dict[str, str] = {}
    cycles: list[str] = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*trail[trail.index(target) :], target]))
            elif target not in state:
                visit(target, [*trail, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_module_outgrows_one_read():
    """No module over 500 lines anywhere, a replica's over 400; the formatter's output
    accepted (a marker only where a table reads better aligned)."""
    modules = [path for folder in CODE for path in sorted((ROOT / folder).rglob("*.py"))]
    lengths = {str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in modules}
    limit = {path: 400 if path.startswith("service/") else 500 for path in lengths}
    assert {path: n for path, n in lengths.items() if n > limit[path]} == {}
    markers = sum(path.read_text().count("# fmt: skip") for path in SERVICE.rglob("*.py"))
    assert markers <= 5, markers


PROJECT_PACKAGES = ("service", "balancer", "localcluster", "loadtest")


def _top_level_imports(path: Path) -> set[str]:
    """The project modules `path` imports when it is imported: module-level statements
    (an import inside a function runs only when called, and TYPE_CHECKING never)."""
    found: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PROJECT_PACKAGES:
                for alias in node.names:
                    candidate = f"{node.module}.{alias.name}"
                    found.add(candidate if _is_module(candidate) else node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.split(".")[0] in PROJECT_PACKAGES)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(ast.parse(path.read_text()).body)
    return found


def _source(module: str) -> Path:
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py") if path.with_suffix(".py").is_file() else path / "__init__.py"


def _files_imported(entry_points: list[Path]) -> set[str]:
    """Every project file that importing `entry_points` loads, parent packages included."""
    seen: set[Path] = set()
    todo = list(entry_points)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in _top_level_imports(path):
            parts = module.split(".")
            todo += [_source(".".join(parts[:i])) for i in range(1, len(parts) + 1)]
    return {str(path.relative_to(ROOT)) for path in seen}


def _copied(dockerfile: Path) -> list[str]:
    """The repository paths a Dockerfile's final stage COPYs from the build context."""
    lines = [line.split() for line in dockerfile.read_text().splitlines() if line.startswith("COPY ")]
    return [parts[-2] for parts in lines if not any(p.startswith("--from") for p in parts)]


def test_what_each_image_runs_imports_only_what_it_carries():
    """The loadtest image runs `python -m loadtest.remote`, Locust's locustfile and shapes; the
    api image gunicorn with the service (and train_models.py at build). Each imports only
    files its Dockerfile copies: a new import that reaches further breaks here, not in an image."""
    images = {
        ROOT / "loadtest" / "Dockerfile": ["loadtest/remote.py", "loadtest/locustfile.py", "loadtest/shapes.py"],
        ROOT / "service" / "Dockerfile": ["service/gunicorn.conf.py", "service/wsgi.py", "scripts/train_models.py"],
    }
    for dockerfile, entry_points in images.items():
        copied = _copied(dockerfile)
        imported = _files_imported([ROOT / entry for entry in entry_points])
        missing = sorted(path for path in imported if not any(path == c or path.startswith(c) for c in copied))
        assert missing == [], f"{dockerfile.relative_to(ROOT)} does not copy {missing}"
