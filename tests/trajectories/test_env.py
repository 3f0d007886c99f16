"""Repository sources and environments (the calc fixture prepared once per session)."""

from __future__ import annotations

import subprocess

import pytest

from cwm_forager.env import make_executor
from cwm_forager.repos import RepositoryError, RepoSource, fetch


def test_sources_validate_and_name_themselves():
    assert RepoSource.from_spec("toolz==1.0.0").name == "toolz-1.0.0"
    assert RepoSource.from_spec({"git": "https://x.org/a/b.git", "ref": "v1"}).name == "b@v1"
    with pytest.raises(ValueError, match="exactly one of pypi, path, git"):
        RepoSource.from_spec({"pypi": "a==1", "path": "x"})
    with pytest.raises(ValueError, match="pin it as 'name==version'"):
        RepoSource(pypi="toolz>=1")
    with pytest.raises(ValueError, match="unknown field"):
        RepoSource.from_spec({"path": "x", "branch": "main"})
    with pytest.raises(RepositoryError, match="not a folder"):
        fetch(RepoSource(path="/nonexistent/repo"))


def test_git_source_is_cloned_at_its_ref(tmp_path, calc_env):
    origin = tmp_path / "origin"
    subprocess.run(["cp", "-r", str(calc_env.base), str(origin)], check=True)
    git = ["git", "-C", str(origin), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "one"], check=True)
    first = subprocess.run(git[:3] + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (origin / "calc" / "arith.py").write_text("# changed\n")
    subprocess.run(git + ["commit", "-qam", "two"], check=True)
    tree = fetch(RepoSource(git=str(origin) + "/.git", ref=first), cache=tmp_path / "cache")
    assert "def add" in (tree / "calc" / "arith.py").read_text()
    assert fetch(RepoSource(git=str(origin) + "/.git", ref=first), cache=tmp_path / "cache") == tree


def test_prepared_environment(calc_env):
    assert len(calc_env.suite) == 16 and calc_env.baseline_failing == []
    assert calc_env.source_files() == ["calc/__init__.py", "calc/arith.py", "calc/stats.py"]
    covering = calc_env.covering_tests()
    assert covering[("calc/arith.py", "gcd")] == ["tests/test_arith.py::test_gcd"]
    assert "tests/test_stats.py::test_variance" in covering[("calc/arith.py", "mean")]


def test_task_copies_are_private_and_runs_report_per_test(calc_env):
    copy = calc_env.fresh_task_copy()
    try:
        source = copy / "calc" / "arith.py"
        source.write_text(source.read_text().replace("return a + b", "return a - b"))
        report = calc_env.run_tests(copy, ["tests/test_arith.py::test_add",
                                           "tests/test_arith.py::test_gcd"])
        assert report.failed == ["tests/test_arith.py::test_add"]
        assert report.passed == ["tests/test_arith.py::test_gcd"] and report.reason is None
        assert "return a + b" in (calc_env.base / "calc" / "arith.py").read_text()
        (copy / "tests" / "test_arith.py").write_text("def test_add():\n    pass\n")
        calc_env.restore_tests(copy)  # grading never trusts edited tests
        assert "assert add(2, 3) == 5" in (copy / "tests" / "test_arith.py").read_text()
    finally:
        calc_env.discard(copy)


def test_docker_backend_needs_an_engine(tmp_path):
    try:
        import docker

        docker.from_env().ping()
        pytest.skip("a Docker engine is reachable here")
    except Exception:
        pass
    with pytest.raises(RepositoryError, match="backend 'docker': no Docker engine reachable"):
        make_executor("docker", tmp_path)
    assert type(make_executor("auto", tmp_path)).__name__ == "SandboxExecutor"
