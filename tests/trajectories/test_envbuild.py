"""Environment builder: declared dependencies read from fixture trees (fast, no network), and one
real build of a PyPI sdist with a dependency (slow: downloads from PyPI)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from cwm_exec.sandbox import Limits
from cwm_forager import envbuild
from cwm_forager.env import Environments, RepoEnvironment
from cwm_forager.envbuild import EnvBuildError, declared_requirements
from cwm_forager.repos import RepositoryError, RepoSource, fetch
from tests.scripted_endpoint import JSONHandler, base_url, chat_reply, serving


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text).lstrip())
    return root


def test_pyproject_dependencies_test_extra_and_groups(tmp_path):
    write(tmp_path, {"pyproject.toml": """
        [project]
        name = "Demo_Pkg"
        dependencies = ["attrs>=22", "rpds-py; python_version >= '3.8'"]
        [project.optional-dependencies]
        tests = ["pytest>=7", "demo-pkg[speedups]"]
        speedups = ["ujson"]
        docs = ["sphinx"]
        [dependency-groups]
        test = ["pytest-mock", {include-group = "typing"}]
        typing = ["mypy>=1"]
        lint = ["ruff"]
        """})
    declared = declared_requirements(tmp_path)
    assert declared.project == "Demo_Pkg"
    assert declared.requirements == (
        "attrs>=22", 'rpds-py; python_version >= "3.8"', "pytest>=7", "pytest-mock", "mypy>=1",
        "ujson")  # the docs extra and the lint group are not test dependencies
    assert declared.sources[0] == "pyproject.toml [project] dependencies (2)"
    assert any("[speedups] (referenced as the project's extra)" in s for s in declared.sources)


def test_setup_cfg_and_dev_extra_only_when_no_test_extra(tmp_path):
    write(tmp_path, {"setup.cfg": """
        [metadata]
        name = demo
        [options]
        install_requires =
            six>=1.10  # comment
            webencodings
        [options.extras_require]
        dev = tox
            pytest-cov
        """})
    declared = declared_requirements(tmp_path)
    assert declared.requirements == ("six>=1.10", "webencodings", "tox", "pytest-cov", "pytest")
    assert "added: the suite runs under pytest (1)" in declared.sources


def test_static_setup_py_is_read_without_running_it(tmp_path):
    write(tmp_path, {"setup.py": """
        import sys
        from setuptools import setup
        REQUIRES = ["requests>=2", "idna"]
        sys.exit("running this file is an error")
        setup(name="demo", install_requires=REQUIRES, tests_require=["pytest", "mock"],
              extras_require={"testing": ["hypothesis"], "cli": ["click"]})
        """, "PKG-INFO": "Metadata-Version: 2.1\nName: demo\nVersion: 1.2.3\n\nbody\n"})
    declared = declared_requirements(tmp_path)
    assert declared.requirements == ("requests>=2", "idna", "pytest", "mock", "hypothesis")
    assert (declared.project, declared.version) == ("demo", "1.2.3")


def test_dynamic_setup_py_is_recorded_as_not_read(tmp_path):
    write(tmp_path, {"setup.py": """
        from setuptools import setup
        setup(name="demo", install_requires=open("reqs.txt").read().split())
        """})
    declared = declared_requirements(tmp_path)
    assert declared.requirements == ("pytest",)
    assert declared.skipped == ("setup.py: install_requires not literal (not read)",)


def test_requirement_files_follow_includes_and_drop_options(tmp_path):
    write(tmp_path, {
        "requirements.txt": "-e .\nclick>=8 \\\n    --hash=sha256:abc\n--index-url https://x\n",
        "requirements/tests.txt": "-r base.txt\npytest==8.1.1  # pinned\n./vendor/pkg\n",
        "requirements/base.txt": "-r tests.txt\nattrs\n",
        "requirements-dev.txt": "black\n",  # ignored: a test file exists
    })
    declared = declared_requirements(tmp_path)
    assert declared.requirements == ("click>=8", "attrs", "pytest==8.1.1")
    assert "requirements.txt: '-e .' (an option, editable or local path: not resolved)" \
        in declared.skipped
    assert any("'./vendor/pkg'" in s for s in declared.skipped)


def test_tox_deps_plain_lines_only(tmp_path):
    write(tmp_path, {"tox.ini": """
        [tox]
        envlist = py311
        [testenv]
        deps =
            pytest
            py311: numpy
            wrapt1.10: wrapt ~= 1.10.0
            {[base]deps}
            -rreq-tox.txt
        commands = pytest
        """, "req-tox.txt": "freezegun\n"})
    declared = declared_requirements(tmp_path)
    assert declared.requirements == ("pytest", "freezegun")
    assert len(declared.skipped) == 3 and all("(substitution or factor)" in s
                                              for s in declared.skipped)


def test_bad_files_are_named(tmp_path):
    write(tmp_path, {"pyproject.toml": "[project\nname = 1\n"})
    with pytest.raises(EnvBuildError, match="pyproject.toml: not valid TOML"):
        declared_requirements(tmp_path)
    write(tmp_path, {"pyproject.toml": """
        [dependency-groups]
        test = [{include-group = "a"}]
        a = [{include-group = "test"}]
        """})
    with pytest.raises(EnvBuildError, match="include-group cycle test -> a -> test"):
        declared_requirements(tmp_path)
    write(tmp_path, {"pyproject.toml": "[project]\ndependencies = ['ok', 'not a valid req!']\n"})
    assert "'not a valid req!'" in declared_requirements(tmp_path).skipped[0]


def test_pins_key_and_pip_messages():
    report = {"install": [{"metadata": {"name": "Six", "version": "1.16.0"}},
                          {"metadata": {"name": "python_dateutil", "version": "2.9.0"}}]}
    pins = envbuild.pins_from_report(report)
    assert pins == ["python-dateutil==2.9.0", "six==1.16.0"]
    assert envbuild.environment_key(pins) == envbuild.environment_key(pins[::-1])
    assert envbuild.environment_key(pins) != envbuild.environment_key(pins[:1])
    words = ("ERROR: Could not find a version that satisfies the requirement sgmllib3k "
             "(from versions: none)\nERROR: No matching distribution found for sgmllib3k")
    assert envbuild.missing_wheels(words) == ["sgmllib3k"]
    skipped: list[str] = []  # the project itself, pulled in by a test dependency, is not pinned
    assert envbuild._without_project(pins, "Python_DateUtil", skipped) == ["six==1.16.0"]
    assert skipped[0].startswith("pin python-dateutil==2.9.0: the project itself")


LIMITS = Limits(wall_seconds=60, cpu_seconds=60, memory_mb=2048, output_bytes=1 << 20,
                processes=128)


@pytest.mark.slow
def test_real_sdist_with_a_dependency(tmp_path):
    """isodate 0.6.1 imports six (its one dependency); its tests live in the package."""
    envs = Environments(LIMITS)  # as the trajectories step asks: options in the source spec
    try:
        env = envs.get({"pypi": "isodate==0.6.1", "dependencies": True,
                        "resolveBefore": "2026-12-01T00:00:00Z"})
        build = env.build
        assert build is not None and build.ok and build.stage == "done"
        assert "setup.py install_requires (1)" in build.sources
        assert any(p.startswith("six==") for p in build.pins)
        assert build.tests_passed == len(env.suite) >= 10
        probe = env.run([env.interpreter.python, "-c",
                         "import six, importlib.metadata as m; print(m.version('isodate'));"
                         "import torch"], env.base)
        assert probe.stdout.decode().strip() == "0.6.1"  # the project's metadata, not installed
        assert b"No module named 'torch'" in probe.stderr  # the pipeline's packages are not seen
    finally:
        envs.close()
    again = envbuild.BuildResult("isodate")
    envbuild.build(fetch(RepoSource(pypi="isodate==0.6.1")), again,
                   uploaded_prior_to="2026-12-01T00:00:00Z")
    assert again.env_reused and again.pins == build.pins  # cached by the resolved set
    assert again.resolution_reused  # the resolve date is fixed: pip is not asked again


@pytest.mark.slow
def test_a_dependency_without_wheels_is_recorded(tmp_path):
    """sgmllib3k publishes only an sdist: without build_sdists the build stops at resolve;
    with it, the sdist is built in the sandbox and the suite runs."""
    tree = write(tmp_path / "nowheel", {"requirements.txt": "sgmllib3k==1.0.0\n",
                                        "test_x.py": "def test_x():\n    import sgmllib\n"})
    env = RepoEnvironment({"path": str(tree)}, limits=LIMITS, workroot=tmp_path / "w",
                          dependencies=True)
    try:
        with pytest.raises(RepositoryError, match="stopped at resolve: pip could not resolve"):
            env.prepare()
        assert env.build is not None and not env.build.ok
        assert (env.build.stage, env.build.missing_wheels) == ("resolve", ["sgmllib3k==1.0.0"])
    finally:
        env.close()
    # With build_sdists, pip builds the wheel inside the sandbox and the build goes on.
    env = RepoEnvironment({"path": str(tree)}, limits=LIMITS, workroot=tmp_path / "w2",
                          dependencies=True, build_sdists=True)
    try:
        env.prepare()
        assert env.build is not None and env.build.built_sdists and env.build.stage == "done"
        assert "sgmllib3k==1.0.0" in env.build.pins and env.suite == ["test_x.py::test_x"]
    finally:
        env.close()


def test_advice_parsing_and_merging(tmp_path):
    advice = envbuild.parse_advice('Sure.\n```json\n{"add": ["six>=1.16"], "drop": ["Coveralls"],'
                                   ' "why": "tests import six"}\n```')
    assert advice == envbuild.Advice(("six>=1.16",), ("Coveralls",), "tests import six")
    declared = envbuild.Declared("demo", "1", ("coveralls", "pytest"), ("requirements.txt (2)",))
    amended = advice.apply(declared)
    assert amended.requirements == ("pytest", "six>=1.16")
    assert amended.sources[-1] == "advice: +1 -1"
    later = envbuild.Advice(("mock",), ("six",)).merged(advice)
    assert (later.add, later.drop) == (("mock",), ("Coveralls", "six"))
    for reply, words in (("no json here", "no JSON object"), ('{"add": "six"}', "list of strings"),
                         ('{"add": ["not a req!"]}', "not a requirement"), ("{bad}", "not JSON")):
        with pytest.raises(EnvBuildError, match=words):
            envbuild.parse_advice(reply)
    write(tmp_path, {"setup.cfg": "[options]\ninstall_requires = six\n"})
    result = envbuild.BuildResult("demo", stage="test", declared=["six"])
    context = envbuild.failure_context(tmp_path, result, "E   ModuleNotFoundError: No module named 'x'")
    assert "Stage reached: test" in context and "No module named 'x'" in context
    assert "--- setup.cfg ---\n[options]" in context


class ScriptedAdvisor(JSONHandler):
    """A chat-completions server that advises adding ``six`` only when the failure it is shown
    says six is missing (otherwise: no advice), and records what it was asked."""

    asked: list[str] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = self.read_json()
        context = body["messages"][-1]["content"]
        type(self).asked.append(context)
        advice = ({"add": ["six"], "why": "the tests import six"}
                  if "No module named 'six'" in context else {"add": [], "drop": []})
        self.send_json(200, chat_reply(json.dumps(advice), body["model"]))


@pytest.mark.slow
def test_advisor_adds_an_undeclared_test_dependency(tmp_path, monkeypatch):
    """The tests import six, which nothing declares: the deterministic build stops at the test
    stage; the advisor (the real openai client, a local scripted endpoint) adds six."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    tree = write(tmp_path / "repo", {"requirements.txt": "pytest\n",
                                      "test_six.py": "import six\n\ndef test_six():\n"
                                                     "    assert six.PY3\n"})
    env = RepoEnvironment({"path": str(tree)}, limits=LIMITS, workroot=tmp_path / "w")
    with serving(ScriptedAdvisor) as httpd:
        try:
            envbuild.prepare_with_advice(env, envbuild.OpenAIAdvisor(base_url(httpd), "m"),
                                         rounds=2)
            assert env.build is not None and env.build.stage == "done" and env.suite == [
                "test_six.py::test_six"]
            assert [a["after_stage"] for a in env.build.advice] == ["test"]
            assert env.build.advice[0]["add"] == ("six",) and any(
                p.startswith("six==") for p in env.build.pins)
            assert len(ScriptedAdvisor.asked) == 1 \
                and "--- requirements.txt ---" in ScriptedAdvisor.asked[0]
        finally:
            env.close()


def test_a_module_that_cannot_be_imported_is_left_out_of_the_suite(tmp_path):
    """The pristine run goes past a test module whose imports fail (as referencing's sdist
    ships the JSON-Schema test suite's own check, which needs jsonschema)."""
    tree = write(tmp_path / "repo", {"test_ok.py": "def test_ok():\n    assert True\n",
                                     "suite/test_other.py": "import not_installed_anywhere\n"})
    env = RepoEnvironment({"path": str(tree)}, limits=LIMITS, workroot=tmp_path / "w")
    try:
        env.prepare()
        assert env.suite == ["test_ok.py::test_ok"]
        assert "ERROR suite/test_other.py" in env.baseline.output
    finally:
        env.close()
