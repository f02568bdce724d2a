"""launch/torchrun.sh: bad input answered once, before any rank starts, and the
one launch environment it shares with the SLURM scripts."""

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.launch.test_slurm import TRAIN, one_error_line
from tests.ltrain.test_preempt import signal_after_step

REPO = Path(__file__).resolve().parents[2]


def torchrun_sh(*args, env=None, timeout=120):
    return subprocess.run(["bash", "launch/torchrun.sh", *args], cwd=REPO, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def test_config_error_is_printed_once_not_per_rank(tmp_path):
    proc = torchrun_sh("2", *TRAIN, "model.n_kv_heads=3", f"trainer.out_dir={tmp_path}")
    line = one_error_line(proc, "config")
    assert line.startswith("ltrain: config error: model.n_kv_heads=3 is invalid")
    assert "ChildFailedError" not in proc.stdout + proc.stderr and list(tmp_path.iterdir()) == []


def test_world_size_that_does_not_match_dp_is_one_line(tmp_path):
    proc = torchrun_sh("2", *TRAIN, "parallel.dp=4", f"trainer.out_dir={tmp_path}")
    assert "(launch: 1 node(s) x 2 process(es) per node)" in one_error_line(proc, "config")


def test_usage_and_multi_node_without_a_reachable_master():
    proc = torchrun_sh()
    assert proc.returncode == 2 and proc.stderr.startswith("usage: launch/torchrun.sh NPROC")
    env = {"NNODES": "2", "LTRAIN_RUN_ID": "x", "MASTER_ADDR": "127.0.0.1"}
    assert "MASTER_ADDR=127.0.0.1" in one_error_line(torchrun_sh("2", env=env), "launch")
    assert "LTRAIN_RUN_ID" in one_error_line(torchrun_sh("2", env={"NNODES": "2", "LTRAIN_RUN_ID": ""}), "launch")


def test_launch_environment_is_defined_once():
    """torchrun.sh, slurm.sbatch and slurm_node.sh source launch/env.sh and set none of it themselves."""
    keys = ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "NCCL_", "TORCH_NCCL", "GLOO_", "TORCH_ELASTIC_SHUTDOWN")
    env_sh = (REPO / "launch" / "env.sh").read_text()
    assert all(k in env_sh for k in keys if k != "GLOO_")
    for script in ("torchrun.sh", "slurm.sbatch", "slurm_node.sh"):
        text = (REPO / "launch" / script).read_text()
        assert "/env.sh" in text, script
        code = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
        assert not [ln for ln in code if any(k in ln for k in keys)], script
    # What a launched rank sees: the shared values, overridable from outside.
    script = "source launch/env.sh; echo $DS_ACCELERATOR $TORCH_EXTENSIONS_DIR $TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
    env = {k: v for k, v in os.environ.items() if k not in ("DS_ACCELERATOR", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT")}
    out = subprocess.run(["bash", "-c", script], cwd=REPO, env={**env, "TORCH_EXTENSIONS_DIR": "/x"},
                         capture_output=True, text=True).stdout.split()
    assert out[1:] == ["/x", "120"] and out[0] in ("cpu", "cuda")


@pytest.mark.slow
def test_ctrl_c_and_sigterm_reach_the_ranks(tmp_path):
    """The ranks run in sessions of their own: the script hands a terminal's Ctrl-C
    (to its process group) and a `kill` of it to them. Two 2-rank runs side by side."""
    def start(name):
        return subprocess.Popen(["bash", "launch/torchrun.sh", "2", *TRAIN, "trainer.max_steps=400",
                                 f"trainer.out_dir={tmp_path}"], cwd=REPO, text=True, start_new_session=True,
                                env={**os.environ, "LTRAIN_RUN_ID": name}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)

    intr, term = start("intr"), start("term")
    signal_after_step(intr, tmp_path / "intr" / "metrics.jsonl", signal.SIGINT, group=True)
    signal_after_step(term, tmp_path / "term" / "metrics.jsonl", signal.SIGTERM)
    intr_out, _ = intr.communicate(timeout=300)
    term_out, _ = term.communicate(timeout=300)
    assert intr.returncode == 0 and term.returncode == 0, intr_out[-3000:] + term_out[-3000:]
    assert "Traceback" not in intr_out + term_out
    assert "on SIGINT: not saved" in intr_out and not list((tmp_path / "intr" / "checkpoints").glob("step_*"))
    step = int(term_out.split("stopped at step ")[1].split()[0])
    assert "on SIGTERM: checkpoint saved" in term_out and step < 400
    assert (tmp_path / "term" / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
