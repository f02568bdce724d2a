"""benchmarks/bf16_training.py: the step-by-step comparison, the commands it runs, and a
2-step smoke run of fp32 cp=1 against bf16 cp=2 (torchrun, gloo)."""

import sys

import pytest

from benchmarks import bf16_training as bt


def test_compare_is_step_by_step_absolute_difference():
    a = [5.0, 4.0, 3.0, 2.0, 1.0, 0.5]
    b = [5.0, 4.5, 2.9, 2.0, 1.2, 0.4]
    c = bt.compare(a, b)
    assert c["mean_abs"] == pytest.approx((0 + 0.5 + 0.1 + 0 + 0.2 + 0.1) / 6)
    assert (c["max_abs"], c["max_step"]) == (pytest.approx(0.5), 2)
    assert c["final_abs"] == pytest.approx(0.1)
    assert c["max_abs_first"] == pytest.approx(0.5)  # steps 1-5
    with pytest.raises(ValueError):  # runs of different lengths are not compared
        bt.compare(a, b[:-1])


def test_commands_differ_only_in_precision_and_cp(tmp_path):
    one, two = bt.command("fp32-cp1", 50, tmp_path), bt.command("bf16-cp2", 50, tmp_path)
    assert one[:3] == [sys.executable, "-m", "ltrain.train"]
    assert two[0].endswith("torchrun") and "--nproc_per_node=2" in two
    assert {"trainer.precision=fp32", "parallel.cp=1"} <= set(one) and {"trainer.precision=bf16", "parallel.cp=2"} <= set(two)
    assert set(one[3:]) - {"trainer.precision=fp32", "parallel.cp=1"} == set(two[5:]) - {"trainer.precision=bf16",
                                                                                       "parallel.cp=2"}
    pairs = bt.comparisons({name: {"losses": [1.0]} for name in ("fp32-cp1", "bf16-cp1", "bf16-cp2")})
    assert [(p["run"], p["reference"]) for p in pairs] == [("bf16-cp1", "fp32-cp1"), ("bf16-cp2", "fp32-cp1"),
                                                          ("bf16-cp2", "bf16-cp1")]


@pytest.mark.slow  # two ltrain-train start-ups, one under torchrun (~1 min on 2 cores)
def test_smoke_fp32_against_bf16_cp2():
    report = bt.main(["--steps", "2", "--runs", "fp32-cp1,bf16-cp2"], write=False)
    assert [r["run"] for r in report["runs"]] == ["fp32-cp1", "bf16-cp2"]
    assert all(len(r["losses"]) == 2 for r in report["runs"])
    (c,) = report["comparisons"]
    assert (c["run"], c["reference"]) == ("bf16-cp2", "fp32-cp1")
    assert 0 <= c["mean_abs"] < 0.2  # same seed and data: bf16 and the cp split move the loss by little
    md = bt.markdown(report)
    assert "| bf16-cp2 | fp32-cp1 |" in md and report["commit"] in md
