"""benchmarks/provenance.py: the command as it was started, the commit and its dirty state from
a real git repository, and the keys every results file carries."""

import subprocess
import sys
import types

import pytest

from benchmarks import provenance as prov

KEYS = {"command", "commit", "uncommitted", "machine", "started_at", "load_avg_1m_start"}


def _main(monkeypatch, file, spec_name=None):
    main = types.ModuleType("__main__")
    main.__file__ = str(file)
    main.__spec__ = types.SimpleNamespace(name=spec_name) if spec_name else None
    monkeypatch.setitem(sys.modules, "__main__", main)


def test_command_as_file_as_module_and_as_library(monkeypatch):
    script = prov.REPO / "benchmarks" / "attention.py"
    _main(monkeypatch, script)  # python benchmarks/attention.py ...
    assert prov.command(["--seq-lens", "4096", "a b"], str(script)) == \
        "python benchmarks/attention.py --seq-lens 4096 'a b'"
    _main(monkeypatch, script, "benchmarks.attention")  # python -m benchmarks.attention ...
    assert prov.command(["--x", 1], str(script)) == "python -m benchmarks.attention --x 1"
    _main(monkeypatch, prov.REPO / "somewhere" / "pytest_main.py", "pytest")  # main(argv) from a test
    assert prov.command([], str(script)) == "python -m benchmarks.attention"


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_commit_is_dirty_only_for_changed_tracked_files(tmp_path, monkeypatch):
    monkeypatch.setattr(prov, "REPO", tmp_path)
    assert prov.git_state() == ("unknown", [])  # not a repository
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("1\n")
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "x.json").write_text("{}\n")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "c")
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True,
                         text=True).stdout.strip()
    assert prov.git_state() == (sha, [])
    (tmp_path / "benchmarks" / "results" / "x.json").write_text("{\"new\": 1}\n")  # outputs: not code
    (tmp_path / "new file.py").write_text("2\n")  # untracked: listed, not dirty
    assert prov.git_state() == (sha, ["new file.py"])
    (tmp_path / "a.py").write_text("3\n")
    assert prov.git_state() == (sha + "-dirty", ["a.py", "new file.py"])


def test_provenance_keys_and_markdown_line():
    p = prov.provenance(["--steps", "3"], str(prov.REPO / "benchmarks" / "lightning.py"))
    assert set(p) == KEYS
    assert p["command"] == "python -m benchmarks.lightning --steps 3"
    assert set(p["machine"]) == {"cpu", "arch", "cores", "memory_gib", "torch", "gpu"}
    assert p["machine"]["cores"] >= 1 and p["load_avg_1m_start"] >= 0
    assert "load_avg_1m_end" not in prov.markdown_line(p) and "at the end" not in prov.markdown_line(p)
    done = prov.finish(p)
    assert done is p and set(p) == KEYS | {"load_avg_1m_end", "finished_at"}
    line = prov.markdown_line(p)
    for text in (p["command"], p["commit"], p["machine"]["cpu"], p["machine"]["torch"], "at the end"):
        assert text in line


@pytest.mark.parametrize("n_files, shown", [(0, ""), (2, "uncommitted changes to a, b"),
                                            (9, "uncommitted changes to 9 files, listed in the JSON")])
def test_markdown_line_names_uncommitted_files(n_files, shown):
    files = ["a", "b"] if n_files == 2 else [f"f{i}" for i in range(n_files)]
    p = dict(command="python x.py", commit="abc1234" + ("-dirty" if files else ""), uncommitted=files,
             machine=dict(cpu="CPU", arch="x86_64", cores=2, memory_gib=24.0, torch="2.13", gpu=None),
             started_at="t", load_avg_1m_start=1.0)
    line = prov.markdown_line(p)
    assert (shown in line) if shown else "uncommitted" not in line
    assert "no GPU" in line and "2 cores" in line
