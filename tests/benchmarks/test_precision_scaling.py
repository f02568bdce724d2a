"""benchmarks/precision_scaling.py at tiny sizes: the results files' structure (the numbers are the
half-precision tests' business, tests/parallel/test_*.py)."""

import json

from benchmarks import precision_scaling as ps
from benchmarks import provenance


def test_results_structure(tmp_path, monkeypatch):
    monkeypatch.setattr(provenance, "REPO", tmp_path)  # keep benchmarks/results/ as it is
    (tmp_path / "benchmarks").mkdir()
    # One collective, two spawns (about 30 s on two cores): the structure, not the numbers.
    report = ps.main(["--seq-len", "128", "--cps", "1", "2", "--collectives", "lasp2", "--tag", "smoke"])
    saved = json.loads((tmp_path / "benchmarks/results/precision_scaling-smoke.json").read_text())
    assert saved == json.loads(json.dumps(report))
    for key in ("command", "commit", "machine", "load_avg_1m_start", "load_avg_1m_end", "seq_len", "cps", "rows"):
        assert key in saved, key
    assert [(r["collective"], r["dtype"]) for r in saved["rows"]] == [("lasp2", "bf16")]
    for row in saved["rows"]:
        names = {"out", "dq", "dk", "dv", "ddecay"}
        assert set(row["plain_err"]) == names and row["yardstick"]
        assert set(row["by_cp"]) == {"1", "2"}
        for cell in row["by_cp"].values():
            assert set(cell["err"]) == set(cell["ratio"]) == names
            assert all(e >= 0 for e in cell["err"].values()) and isinstance(cell["meets_criterion"], bool)
    md = (tmp_path / "benchmarks/results/precision_scaling-smoke.md").read_text()
    assert md.startswith("# Half-precision error") and "Command: `" in md
    assert "| lasp2 (contiguous) | bf16 | out |" in md and "| lasp2 (contiguous) | bf16 | ddecay |" in md
    assert ps.skip_reason("ulysses", 8) and ps.skip_reason("ring", 8) is None
