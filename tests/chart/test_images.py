"""The three Dockerfiles, checked statically, in a second (tests/images builds and runs them).

Each is parsed; every base image is pinned to a full version (or a digest); every COPY source
exists in the build context and is not dropped by .dockerignore; the final stage runs as a
numeric non-root USER; and the entry commands are the ones the plan runs: `python -m <module>`
for data steps in the Beam image, `torchrun ... -m cwm_jobs.<stage>` in the trainer image,
`python -m cwm_operator` in the operator image, with every module shipped by the image.
"""

from __future__ import annotations

import ast
import copy
import fnmatch
import importlib.util
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.chart.dockerfile import Dockerfile, ignored, parse, read_dockerignore, substitute
from tests.chart.helm import REPO

DOCKERFILES = {
    "operator": REPO / "operator" / "Dockerfile",
    "beam": REPO / "beam" / "Dockerfile",
    "trainer": REPO / "jobs" / "Dockerfile",
}
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
REQUIREMENTS = {Requirement(r).name.lower(): Requirement(r) for r in PYPROJECT["project"]["dependencies"]}


def package_dirs() -> dict[str, str]:
    """Top-level package -> its folder, as setuptools finds them (packages.find where/include)."""
    find = PYPROJECT["tool"]["setuptools"]["packages"]["find"]
    found: dict[str, str] = {}
    for where in find["where"]:
        for init in sorted((REPO / where).glob("*/__init__.py")):
            name = init.parent.name
            if any(fnmatch.fnmatch(name, pattern) for pattern in find.get("include", ["*"])):
                found[name] = f"{where}/{name}"
    return found


PACKAGE_DIRS = package_dirs()
IGNORE_RULES = read_dockerignore(REPO / ".dockerignore")
UID_GID = re.compile(r"^(\d+)(:(\d+))?$")
FULL_VERSION = re.compile(r"\d+\.\d+\.\d+")


@pytest.fixture(scope="module", params=sorted(DOCKERFILES))
def image(request: pytest.FixtureRequest) -> tuple[str, Dockerfile]:
    return request.param, parse(DOCKERFILES[request.param])


def external_bases(df: Dockerfile) -> list[str]:
    """Images pulled from a registry: FROM bases and COPY --from / RUN --mount from= images."""
    stage_names = {s.name for s in df.stages if s.name}
    refs = [s.base for s in df.stages]
    for stage in df.stages:
        for ins in stage.instructions:
            src = ins.flags.get("from")
            if src is None and "mount" in ins.flags:
                src = dict(kv.split("=", 1) for kv in ins.flags["mount"].split(",") if "=" in kv).get("from")
            if src is not None:
                refs.append(substitute(src, df.stage_args(stage) | df.global_args))
    return [r for r in refs if r not in stage_names]


# ----- generic checks ------------------------------------------------------------------------

def test_base_images_are_pinned(image: tuple[str, Dockerfile]) -> None:
    name, df = image
    bases = external_bases(df)
    assert bases, f"{name}: no base image"
    for ref in bases:
        assert "$" not in ref, f"{name}: unresolved variable in {ref}"
        if "@sha256:" in ref:
            continue
        repo, _, tag = ref.rpartition(":")
        assert repo and "/" not in tag, f"{name}: {ref} has no tag"
        assert tag != "latest" and FULL_VERSION.search(tag), \
            f"{name}: {ref} is not pinned to a full version"


def test_copy_sources_exist_in_the_context(image: tuple[str, Dockerfile]) -> None:
    name, df = image
    stage_names = {s.name for s in df.stages if s.name}
    for stage in df.stages:
        for ins in stage.all("COPY") + stage.all("ADD"):
            assert ins.keyword == "COPY", f"{name}:{ins.line}: use COPY, not ADD"
            if "from" in ins.flags:
                src = ins.flags["from"]
                assert src in stage_names or ":" in src, f"{name}:{ins.line}: unknown stage {src}"
                continue
            if ins.heredocs:
                continue
            words = ins.exec_form() or ins.words()
            *sources, _dest = words
            assert sources, f"{name}:{ins.line}: COPY without a source"
            for src in sources:
                path = REPO / src
                assert path.exists(), f"{name}:{ins.line}: COPY source {src} does not exist"
                # "." is the context itself: what .dockerignore lets through.
                assert src.rstrip("/") in ("", ".") or not ignored(IGNORE_RULES, src.rstrip("/")), \
                    f"{name}:{ins.line}: COPY source {src} is excluded by .dockerignore"


def test_final_stage_runs_as_numeric_non_root(image: tuple[str, Dockerfile]) -> None:
    name, df = image
    user = df.final.last("USER")
    assert user is not None, f"{name}: final stage has no USER"
    match = UID_GID.match(user.args.strip())
    assert match, f"{name}: USER {user.args} is not numeric (Kubernetes runAsNonRoot needs a uid)"
    assert int(match.group(1)) != 0 and (match.group(3) is None or int(match.group(3)) != 0)
    # Nothing after USER switches back to root.
    after = [i for i in df.final.instructions if i.line > user.line]
    assert not any(i.keyword == "USER" for i in after)


def test_uid_matches_the_chart(image: tuple[str, Dockerfile]) -> None:
    name, df = image
    values = yaml.safe_load((REPO / "charts/cwm-operator/values.yaml").read_text())
    uid = int(UID_GID.match(df.final.last("USER").args.strip()).group(1))  # type: ignore[union-attr]
    assert uid == values["operator"]["podSecurityContext"]["runAsUser"]


def test_entry_commands_are_exec_form(image: tuple[str, Dockerfile]) -> None:
    name, df = image
    for keyword in ("ENTRYPOINT", "CMD"):
        ins = df.final.last(keyword)
        if ins is not None:
            assert ins.exec_form() is not None, f"{name}: {keyword} must be exec form (signals)"
    assert df.final.last("ENTRYPOINT") or df.final.last("CMD")


def test_project_installed_from_its_pyproject(image: tuple[str, Dockerfile]) -> None:
    """One distribution: pyproject.toml, README.md and every package folder it maps."""
    name, df = image
    expected = {"pyproject.toml", "README.md", *PACKAGE_DIRS.values()}
    copied = copied_paths(df)
    assert expected <= copied, f"{name}: not copied: {sorted(expected - copied)}"


def test_dockerignore_keeps_sources_and_drops_local_state() -> None:
    for folder in PACKAGE_DIRS.values():
        assert not ignored(IGNORE_RULES, f"{folder}/__init__.py")
    assert not ignored(IGNORE_RULES, "pyproject.toml")
    for junk in (".venv/bin/python", ".cache/bin/helm", ".git/HEAD", "runs/tiny/x.json",
                 "beam/cwm_beam/__pycache__/x.pyc", "tests/conftest.py",
                 "beam/cwm_beam/_ctracer.cpython-311-x86_64-linux-gnu.so"):
        assert ignored(IGNORE_RULES, junk), junk


# ----- versions agree with pyproject ----------------------------------------------------------

def _tag(ref: str) -> str:
    return ref.rpartition(":")[2]


def test_beam_sdk_image_matches_beam_and_python() -> None:
    df = parse(DOCKERFILES["beam"])
    sdk = df.stage("beam-sdk")
    assert sdk is not None
    match = re.fullmatch(r"apache/beam_python(\d+\.\d+)_sdk:(\S+)", sdk.base)
    assert match, sdk.base
    python_tag = _tag(df.final.base)
    assert python_tag.startswith(match.group(1) + "."), "SDK image Python differs from the base"
    assert str(REQUIREMENTS["apache-beam"].specifier) == f"=={match.group(2)}"  # extras aside
    copy = [i for i in df.final.all("COPY") if i.flags.get("from") == "beam-sdk"]
    assert copy and copy[0].words() == ["/opt/apache/beam", "/opt/apache/beam"]
    env = " ".join(i.args for i in df.final.all("ENV"))
    assert "RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT=1" in env


def test_python_bases_satisfy_requires_python() -> None:
    spec = PYPROJECT["project"]["requires-python"]
    for name in ("operator", "beam"):
        version = FULL_VERSION.search(_tag(parse(DOCKERFILES[name]).final.base)).group(0)  # type: ignore[union-attr]
        assert Version(version) in Requirement(f"python{spec}").specifier, (name, version)


def test_torch_and_deepspeed_versions_follow_pyproject() -> None:
    trainer = parse(DOCKERFILES["trainer"])
    build_stage = trainer.stage("build")
    assert build_stage is not None
    devel, runtime = build_stage.base, trainer.final.base
    assert devel.removesuffix("-devel") == runtime.removesuffix("-runtime"), \
        "devel and runtime images must be the same PyTorch/CUDA build"
    torch_version = re.match(r"pytorch/pytorch:(\d+\.\d+\.\d+)-", runtime).group(1)  # type: ignore[union-attr]
    assert Version(torch_version) in REQUIREMENTS["torch"].specifier
    deepspeed = trainer.stage_args(build_stage)["DEEPSPEED_VERSION"]
    assert f"deepspeed=={deepspeed}" == str(REQUIREMENTS["deepspeed"])


# What runs on the Beam image (the plan's `beam` and `job` steps, except those it gives the
# trainer image): none may import torch or DeepSpeed, which that image leaves out.
BEAM_IMAGE_MODULES = ["cwm_beam.traces", "cwm_beam.trajectories", "cwm_jobs.corpus",
                      "cwm_jobs.tokenizer"]


def test_beam_image_steps_import_no_torch() -> None:
    beam = parse(DOCKERFILES["beam"])
    requirements = beam.stage("requirements")
    assert requirements is not None
    assert set(beam.stage_args(requirements)["TRAINING_ONLY"].split()) == {"torch", "deepspeed"}
    code = ("import sys, importlib\n"
            f"for m in {BEAM_IMAGE_MODULES!r}: importlib.import_module(m)\n"
            "print(sorted(n for n in ('torch', 'deepspeed') if n in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


def test_beam_image_runs_every_plan_step_but_training_and_import() -> None:
    """The plan sends every non-training step to the Beam image except the checkpoint import."""
    from cwm_spec.plan import Target, build_plan
    from cwm_spec.validation import load_file

    modules = set()
    for example in ("examples/tiny.yaml", "examples/from-released.yaml"):
        pipeline = load_file(REPO / example, target="local")
        plan = build_plan(pipeline, Target.cluster(pipeline, "ns", {"beam": "B", "trainer": "T"}))
        modules |= {s.module for s in plan.steps if s.image == "B"}
        assert all(s.image == "T" for s in plan.steps if s.kind == "train"
                   or s.module == "cwm_jobs.hf_import")
    assert modules <= set(BEAM_IMAGE_MODULES), modules


def test_operator_requirements_come_from_pyproject(tmp_path: Path) -> None:
    """Run the operator Dockerfile's own requirement script on the real pyproject.toml."""
    df = parse(DOCKERFILES["operator"])
    build = df.stage("build")
    assert build is not None
    script_run = next(i for i in build.all("RUN") if i.words()[:2] == ["python", "-c"])
    names = build_args = df.stage_args(build)["OPERATOR_REQUIREMENTS"].split()
    script = tmp_path / "requirements.py"
    script.write_text(script_run.words()[2])
    done = subprocess.run([sys.executable, str(script), *build_args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pins = done.stdout.split()
    assert sorted(Requirement(p).name.lower() for p in pins) == sorted(n.lower() for n in names)
    assert all(p in PYPROJECT["project"]["dependencies"] for p in pins)
    # The same script refuses a name pyproject does not have.
    bad = subprocess.run([sys.executable, str(script), "no-such-package"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "no-such-package" in bad.stderr


# ----- the plan's commands run in these images ----------------------------------------------

def cluster_plan() -> Any:
    """The plan of examples/cluster.yaml for a cluster, with the corpus built by a step too."""
    from cwm_spec.plan import Target, build_plan
    from cwm_spec.validation import parse_pipeline

    doc = yaml.safe_load((REPO / "examples" / "cluster.yaml").read_text())
    doc = copy.deepcopy(doc)
    doc["spec"]["data"]["corpus"].pop("uri", None)
    pipeline = parse_pipeline(doc, target="cluster")
    images = {"beam": "cwm-beam:0.1.0", "trainer": "cwm-trainer:0.1.0"}
    return build_plan(pipeline, Target.cluster(pipeline, "research", images))


def image_programs(df: Dockerfile) -> set[str]:
    """Programs the final image provides on PATH, from what it installs: every Python base has
    `python`; torch installs `torchrun`."""
    programs = {"python"}
    if df.final.base.startswith("pytorch/pytorch:"):
        programs.add("torchrun")
    return programs


def copied_paths(df: Dockerfile) -> set[str]:
    """What the Dockerfile copies from the context; ``COPY . ...`` stands for every file and
    package folder .dockerignore lets through."""
    copied = {w.rstrip("/") for s in df.stages for i in s.all("COPY")
              if "from" not in i.flags and not i.heredocs for w in (i.exec_form() or i.words())[:-1]}
    if copied & {"", "."}:
        context = {"pyproject.toml", "README.md", *PACKAGE_DIRS.values()}
        copied |= {path for path in context if not ignored(IGNORE_RULES, path)}
    return copied


def image_packages(df: Dockerfile) -> set[str]:
    copied = copied_paths(df)
    return {pkg for pkg, folder in PACKAGE_DIRS.items() if folder in copied}


def test_every_plan_step_runs_in_its_image() -> None:
    plan = cluster_plan()
    assert {s.kind for s in plan.steps} == {"beam", "job", "train"}
    for step in plan.steps:
        key = "trainer" if step.kind == "train" else "beam"
        df = parse(DOCKERFILES[key])
        program, *rest = step.command
        assert program in image_programs(df), f"{step.name}: {program} is not in the {key} image"
        module = rest[rest.index("-m") + 1]
        assert module.split(".")[0] in image_packages(df), f"{step.name}: {module} not shipped"
        assert importlib.util.find_spec(module) is not None, f"{step.name}: no module {module}"


def test_beam_image_smoke_imports_the_data_steps() -> None:
    """The build fails early if a data step's module cannot be imported in the image."""
    plan = cluster_plan()
    df = parse(DOCKERFILES["beam"])
    smoke = " ".join(i.args for s in df.stages for i in s.all("RUN"))
    for step in plan.steps:
        if step.kind != "train":
            assert step.module in smoke, f"{step.module} missing from the beam image's import check"


def test_beam_image_builds_the_c_tracer() -> None:
    """The extension is optional at install time (no compiler: the Python recorder), so the
    image checks it was built: a compiler in the build stage and an import of the module."""
    df = parse(DOCKERFILES["beam"])
    build = " ".join(i.args for i in df.stage("build").all("RUN"))  # type: ignore[union-attr]
    final = " ".join(i.args for i in df.final.all("RUN"))
    assert "gcc" in build and "cwm_exec._ctracer" in final


def test_trainer_default_command_is_a_plan_command() -> None:
    df = parse(DOCKERFILES["trainer"])
    cmd = df.final.last("CMD").exec_form()  # type: ignore[union-attr]
    assert df.final.last("ENTRYPOINT") is None
    assert cmd[0] == "torchrun" and cmd[cmd.index("-m") + 1].startswith("cwm_jobs.")
    plan_cmds = {s.command[-1] for s in cluster_plan().steps if s.kind == "train"}
    assert cmd[-1] in plan_cmds


def test_operator_entrypoint_is_the_operator_module() -> None:
    from cwm_operator.main import parse_args

    df = parse(DOCKERFILES["operator"])
    assert df.final.last("ENTRYPOINT").exec_form() == ["python", "-m", "cwm_operator"]  # type: ignore[union-attr]
    assert importlib.util.find_spec("cwm_operator.__main__") is not None
    args = parse_args(df.final.last("CMD").exec_form())  # type: ignore[union-attr]
    assert args.all_namespaces and args.liveness and args.metrics_port


# ----- the operator image carries every distribution the operator process imports ------------

PROJECT_PACKAGES = set(PACKAGE_DIRS)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, package: str) -> Iterator[str]:
    """Absolute names imported anywhere in a module (functions included: lazy imports count),
    except under `if TYPE_CHECKING:`."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skip |= {id(n) for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            yield base
            yield from (f"{base}.{a.name}" for a in node.names)


def third_party_imports(start: str) -> set[str]:
    """Top-level names of non-project, non-stdlib modules reachable from `start` through the
    project's own imports (read from source, so lazy imports inside functions count)."""
    seen: set[str] = set()
    found: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        top = name.split(".")[0]
        if top not in PROJECT_PACKAGES:
            if top not in sys.stdlib_module_names and top != "__future__":
                found.add(top)
            continue
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:  # `from module import function`: not a module
            continue
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue  # `from pkg import attribute`: not a module
        package = name if spec.submodule_search_locations else name.rpartition(".")[0]
        tree = ast.parse(Path(spec.origin).read_text())
        todo.extend(_imports(tree, package))
    return found


def requirement_closure(names: Iterable[str]) -> set[str]:
    """Distributions installed by `pip install <names>`: the names and their dependencies,
    recursively (extras not requested are left out)."""
    closure: set[str] = set()
    todo = [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in closure:
            continue
        closure.add(name)
        for req in metadata.requires(name) or []:
            r = Requirement(req)
            if r.marker is None or r.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(r.name))
    return closure


def test_operator_image_has_every_distribution_the_operator_imports() -> None:
    df = parse(DOCKERFILES["operator"])
    names = df.stage_args(df.stage("build"))["OPERATOR_REQUIREMENTS"].split()  # type: ignore[arg-type]
    installed = requirement_closure(names)
    tops = third_party_imports("cwm_operator.__main__")
    assert {"kopf", "kubernetes"} <= tops, tops
    dists = metadata.packages_distributions()
    missing = {t: dists.get(t) for t in tops
               if not {canonicalize_name(d) for d in dists.get(t, [])} & installed}
    assert not missing, f"the operator imports these, but its image does not install them: {missing}"


def test_third_party_imports_follows_lazy_imports() -> None:
    """The walk sees imports inside functions (render.py imports kubeflow lazily)."""
    assert "kubeflow" in third_party_imports("cwm_operator.render")


def test_the_numeric_user_has_a_passwd_entry(image: tuple[str, Dockerfile]) -> None:
    """Arbitrary uids without /etc/passwd entries break getpass.getuser() (torch, git)."""
    name, df = image
    uid, _, gid = df.final.last("USER").args.strip().partition(":")  # type: ignore[union-attr]
    runs = " ".join(i.args for i in df.final.all("RUN"))
    assert re.search(rf"useradd .*--uid {uid}\b.*--gid {gid or uid}\b", runs), name
    assert re.search(rf"groupadd .*--gid {gid or uid}\b", runs), name


# ----- what the classic builder (the `docker` SDK, `make images`) accepts ----------------------

def test_dockerfiles_build_with_the_classic_builder(image: tuple[str, Dockerfile]) -> None:
    """No `# syntax=` line (BuildKit would fetch its frontend from a registry), no heredocs and
    no `RUN --mount` (the classic builder rejects both): tests/images builds these files."""
    name, df = image
    first = DOCKERFILES[name].read_text().splitlines()[0]
    assert not re.match(r"#\s*syntax\s*=", first), f"{name}: `{first}` needs BuildKit's frontend"
    for stage in df.stages:
        for ins in stage.instructions:
            assert not ins.heredocs, f"{name}:{ins.line}: heredoc"
            assert "mount" not in ins.flags, f"{name}:{ins.line}: RUN --mount"


def test_trainer_cpu_variant_is_a_build_argument() -> None:
    """The CUDA build is the default; the CPU variant (built by `make images`) only changes
    build arguments, never the file."""
    df = parse(DOCKERFILES["trainer"])
    build, final = df.stage("build"), df.final
    assert build is not None
    assert df.stage_args(build)["DEEPSPEED_FUSED_ADAM"] == "1"
    args = df.stage_args(final)
    assert args["DEEPSPEED_FUSED_ADAM"] == "1" and args["TORCH_INSTALL"] == ""
