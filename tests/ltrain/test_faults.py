"""Faults a demanding user hits (issue 14): damaged checkpoints, two runs on one run
directory, failed data preparation, bad settings, Ctrl-C. Each case asserts the exact
outcome: the one line and exit code 2, the checkpoint chosen, the corpus unchanged,
bit-identical losses after recovery.

One short real training run (module fixture) provides the checkpoints; every case
that damages them works on its own copy. Resumes and refusals run the real
`ltrain-train` / `ltrain-prepare` as subprocesses.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from ltrain.checkpoint import MANIFEST, CheckpointError, candidates, verify
from ltrain.config import ConfigError, check_known_keys, check_override_keys, register_configs, validate
from ltrain.data.config import DataConfigError
from ltrain.data.memmap import read_meta
from ltrain.data.prepare import main as prepare_main
from ltrain.data.prepare import prepare
from tests.ltrain.data.test_tokenizer import write_word_tokenizer

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
COMMON = ["model=tiny", "attention=dense", "model.n_layers=2", "data.micro_batch_size=2", "data.seq_len=128",
          "trainer.log_every=1", "trainer.progress=false", "parallel.zero_stage=1", "tracking=console"]
STATES = "mp_rank_00_model_states.pt"
register_configs()


def train(run_dir: Path, *args, env_extra=None, wait=True):
    """`ltrain-train` with its run directory given as hydra.run.dir (trainer.out_dir points elsewhere)."""
    env = {**os.environ, "LTRAIN_RUN_ID": "faults", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "ltrain.train", f"hydra.run.dir={run_dir}",
           f"trainer.out_dir={run_dir.parent / 'out_dir'}", *COMMON, *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def steps_and_losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def one_line(stderr: str) -> str:
    """The single line a refused command prints (anything else on stderr fails the test)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr and len(lines) == 1, stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """6 steps, checkpoints at 3 and 6; (run dir, reference losses by step)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    proc = train(run_dir, "trainer.max_steps=6", "trainer.ckpt_every=3", "trainer.keep_last=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, dict(steps_and_losses(run_dir))


@pytest.fixture
def run_copy(trained, tmp_path):
    shutil.copytree(trained[0], tmp_path / "run")
    return tmp_path / "run"


def test_checkpoints_follow_hydra_run_dir(trained):
    run_dir, ref = trained
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_00000003", "step_00000006"]
    assert not (run_dir.parent / "out_dir").exists()  # trainer.out_dir no longer decides where checkpoints go
    files = json.loads((run_dir / "checkpoints" / "step_00000006" / MANIFEST).read_text())["files"]
    assert STATES in files and all(len(e["sha256"]) == 64 and e["size"] > 0 for e in files.values())
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]


def test_flipped_bytes_fall_back_to_the_good_checkpoint_bit_exact(trained, run_copy):
    """Same size, other bytes: skipped with one warning naming the file; the run resumes at
    step 3, reproduces steps 4-5 bit for bit, logs each step once, and pruning with
    keep_last=1 keeps the new good checkpoint although the damaged step 6 is newer."""
    states = run_copy / "checkpoints" / "step_00000006" / STATES
    data = bytearray(states.read_bytes())
    data[len(data) // 2: len(data) // 2 + 8] = bytes(b ^ 0xFF for b in data[len(data) // 2: len(data) // 2 + 8])
    states.write_bytes(bytes(data))
    proc = train(run_copy, "trainer.max_steps=5", "trainer.ckpt_every=2", "trainer.keep_last=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [ln for ln in proc.stderr.splitlines() if "skipping checkpoint" in ln]
    assert len(warnings) == 1 and warnings[0].endswith(
        f"skipping checkpoint: {states.parent} is damaged: {STATES} has the right size but not its recorded "
        "sha256 (bytes changed on disk)")
    assert f"resumed from {run_copy / 'checkpoints' / 'step_00000003'} (step 3)" in proc.stderr
    got = steps_and_losses(run_copy)
    assert [s for s, _ in got] == [1, 2, 3, 4, 5]  # metrics.jsonl: replayed steps once
    assert {s: loss for s, loss in got if s > 3} == {s: trained[1][s] for s in (4, 5)}
    assert sorted(p.name for p in (run_copy / "checkpoints").glob("step_*")) == ["step_00000005", "step_00000006"]
    cli = subprocess.run([BIN / "ltrain-ckpt", "verify", str(run_copy)], capture_output=True, text=True)
    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert cli.stdout.splitlines() == [
        f"damaged  {states.parent} is damaged: {STATES} has the right size but not its recorded sha256 "
        "(bytes changed on disk)",
        f"ok       {run_copy / 'checkpoints' / 'step_00000005'}: step 5, 3 files, "
        f"{cli.stdout.split('3 files, ')[1].split(' MiB')[0]} MiB, sha256 matches",
        f"resume=auto would load {run_copy / 'checkpoints' / 'step_00000005'}",
    ]


def _truncate(p: Path):
    p.write_bytes(p.read_bytes()[:-100])


def _break_zip_keep_size(p: Path):
    data = bytearray(p.read_bytes())
    data[-22:] = b"\0" * 22  # the zip's end-of-central-directory record: torch.load would raise
    p.write_bytes(bytes(data))


def _legacy_manifest(damage):
    """A manifest from before sha256 was recorded (sizes only), then `damage`."""
    def apply(p: Path):
        manifest = json.loads((p.parent / MANIFEST).read_text())
        manifest["files"] = {rel: e["size"] for rel, e in manifest["files"].items()}
        (p.parent / MANIFEST).write_text(json.dumps(manifest))
        damage(p)
    return apply


@pytest.mark.parametrize("damage, problem", [
    (_truncate, rf"{STATES} has \d+ bytes, expected \d+ \(truncated or overwritten\)"),
    (_break_zip_keep_size, f"{STATES} has the right size but not its recorded sha256"),
    (lambda p: p.unlink(), f"{STATES} is missing"),
    (lambda p: (p.parent / MANIFEST).write_text('{"step": 6, "fi'), f"{MANIFEST} is unreadable"),
    (_legacy_manifest(_break_zip_keep_size), f"{STATES} is a broken zip archive"),
])
def test_every_kind_of_damage_is_named(trained, tmp_path, damage, problem):
    ckpt = tmp_path / "step_00000006"
    shutil.copytree(trained[0] / "checkpoints" / "step_00000006", ckpt)
    damage(ckpt / STATES)
    with pytest.raises(CheckpointError, match=f"^{ckpt} is damaged: {problem}"):
        verify(str(ckpt))


def test_legacy_manifest_without_hashes_still_loads(trained, tmp_path):
    ckpt = tmp_path / "step_00000006"
    shutil.copytree(trained[0] / "checkpoints" / "step_00000006", ckpt)
    _legacy_manifest(lambda p: None)(ckpt / STATES)
    assert verify(str(ckpt))["step"] == 6


def test_resume_from_a_checkpoints_directory_takes_its_newest_good_one(trained):
    root = trained[0] / "checkpoints"
    assert candidates("unused", str(root)) == [str(root / "step_00000006"), str(root / "step_00000003")]
    with pytest.raises(CheckpointError, match=f"^{root} holds checkpoints \\(step_\\* directories\\) but is not one"):
        verify(str(root))  # not "the save was interrupted"
    with pytest.raises(CheckpointError, match="is incomplete \\(no ltrain_complete.json: the save was interrupted\\)"):
        os.makedirs(root.parent / "half" / "step_00000009")
        verify(str(root.parent / "half" / "step_00000009"))


def test_checkpoint_that_verifies_but_does_not_load_is_one_line(run_copy):
    """Right bytes, wrong model (3 layers instead of 2): DeepSpeed's RuntimeError becomes one line."""
    proc = train(run_copy, "trainer.max_steps=8", "model.n_layers=3")
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"ltrain: checkpoint error: {run_copy / 'checkpoints' / 'step_00000006'} does not load (")
    assert line.endswith("resume with the config it was saved with, pick another with trainer.resume=PATH, "
                         "or trainer.resume=none") and "Traceback" not in proc.stderr


def test_second_run_on_the_same_directory_is_refused(run_copy):
    """A live run holds the run directory: a second one stops with one line naming it and
    touches nothing. Ctrl-C (ltrain.preempt: stop after this step) then ends the first,
    which saves every step, leaving only checkpoints that verify or that resume skips."""
    first = train(run_copy, "trainer.max_steps=400", "trainer.ckpt_every=1", "trainer.keep_last=2", wait=False)
    deadline = time.time() + 300
    while not any(s >= 7 for s, _ in steps_and_losses(run_copy)):  # running past its resume step 6
        assert first.poll() is None and time.time() < deadline, first.stdout.read()[-3000:]
        time.sleep(0.05)
    second = train(run_copy, "trainer.max_steps=400")
    assert second.returncode == 2
    assert one_line(second.stderr).startswith(f"ltrain: run error: {run_copy} is in use by another run "
                                              f"(pid {first.pid} on {os.uname().nodename}, since ")
    first.send_signal(signal.SIGINT)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 0 and "Traceback" not in out, out[-3000:]
    steps = [s for s, _ in steps_and_losses(run_copy)]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaved or repeated lines
    for ckpt in (run_copy / "checkpoints").glob("step_*"):
        try:
            verify(str(ckpt))
        except CheckpointError as exc:
            assert "is incomplete (no ltrain_complete.json" in str(exc)  # cut off mid-save: never loaded


@pytest.mark.parametrize("args, env, line", [
    (["foo=1"], {}, "ltrain: config error: foo is not a setting (allowed here: model, attention, parallel, data, "
                    "optim, trainer, tracking), fix or remove the override"),
    (["+trainer.max_stpes=5"], {}, "ltrain: config error: trainer.max_stpes is not a setting (closest: "
                                   "trainer.max_steps), fix or remove the override"),
    (["trainer.device=cuda"], {"CUDA_VISIBLE_DEVICES": ""},
     "ltrain: config error: trainer.device='cuda' is invalid: torch sees no CUDA device on this machine"),
    (["tracking=wandb", "tracking.mode=online"], {"WANDB_API_KEY": "", "NETRC": "/nonexistent/netrc"},
     "ltrain: config error: tracking.mode='online' is invalid: wandb has no API key; set WANDB_API_KEY (or run "
     "`wandb login`) or use tracking.mode=offline"),
])
def test_bad_settings_stop_before_the_process_group_with_one_line(tmp_path, args, env, line):
    proc = train(tmp_path / "run", "trainer.max_steps=2", *args, env_extra=env)
    assert proc.returncode == 2
    assert one_line(proc.stderr).startswith(line)
    # No lock, no config.yaml: stopped before any process group (Hydra may have made the empty directory).
    assert not (tmp_path / "run" / "ltrain.lock").exists() and not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.slow
def test_online_wandb_without_key_stops_every_rank(tmp_path):
    env = {**os.environ, "LTRAIN_RUN_ID": "faults", "WANDB_API_KEY": "", "NETRC": "/nonexistent/netrc"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "ltrain.train", f"hydra.run.dir={tmp_path / 'run'}", *COMMON, "tracking=wandb",
                           "tracking.mode=online"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("ltrain: config error: tracking.mode='online' is invalid: wandb has no API key") == 2
    assert time.monotonic() - start < 120  # no rank waited for a collective's time-out
    assert not (tmp_path / "run" / "ltrain.lock").exists() and not (tmp_path / "run" / "config.yaml").exists()


def test_unknown_keys_name_the_closest_known_one():
    with pytest.raises(ConfigError, match=r"^data.seqlen is not a setting \(closest: data.seq_len\)"):
        check_override_keys(["data.seqlen=5"])
    check_override_keys(["model=small", "+experiment=cpu-smoke", "hydra.run.dir=x", "hydra/launcher=basic",
                         "data.seq_len=5", "~trainer.seed", "--multirun", "-c", "job"])
    with initialize_config_module("ltrain.conf", version_base="1.3"):
        dcfg = compose("train", overrides=["+optim.warmup=5"])
    with pytest.raises(ConfigError, match=r"^optim.warmup is not a setting \(closest: optim.warmup_steps\)"):
        check_known_keys(dcfg)


@pytest.fixture
def corpus_dir(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello world\n" * 200)
    out = tmp_path / "corpus"
    prepare([str(src)], out)
    return src, out


def snapshot(directory: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in directory.iterdir()}


@pytest.mark.parametrize("break_source, needle", [
    (lambda src: os.symlink(src / "gone.txt", src / "b.txt"), "cannot read"),  # fails mid-tokenization
    (lambda src: [p.write_bytes(b"\0bin") for p in src.iterdir()], "no text documents"),  # fails at the end
])
def test_failed_prepare_leaves_the_corpus_as_it_was(corpus_dir, capsys, break_source, needle):
    src, out = corpus_dir
    before, siblings = snapshot(out), sorted(p.name for p in out.parent.iterdir())
    break_source(src)
    assert prepare_main([str(src), str(out), "--force"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("ltrain-prepare: error:") and err.count("\n") == 1
    assert snapshot(out) == before and sorted(p.name for p in out.parent.iterdir()) == siblings  # no temp files


def test_ctrl_c_during_prepare_leaves_the_corpus_as_it_was(corpus_dir):
    """SIGINT while the stdlib is being tokenized into the temporary directory."""
    src, out = corpus_dir
    before = snapshot(out)
    stdlib = sysconfig.get_paths()["stdlib"]
    # A shell starts background jobs with SIGINT ignored, and a Python started so never raises
    # KeyboardInterrupt: give the child the default disposition a terminal's Ctrl-C meets.
    proc = subprocess.Popen([BIN / "ltrain-prepare", stdlib, str(out), "--ext", ".py"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    tmp = out.parent / f".corpus.ltrain-prepare-{proc.pid}" / "tokens.bin"
    while not (tmp.exists() and tmp.stat().st_size > 0):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err[-3000:]
    assert one_line(err) == f"ltrain-prepare: error: interrupted, {out} is as it was before; run the command again"
    assert snapshot(out) == before and sorted(p.name for p in out.parent.iterdir()) == ["corpus", "src"]


def test_prepare_into_an_existing_directory_keeps_other_files(corpus_dir):
    src, out = corpus_dir
    (out / "NOTES.md").write_text("mine")
    (src / "b.txt").write_text("more text\n" * 50)
    assert prepare_main([str(src), str(out)]) == 0
    assert (out / "NOTES.md").read_text() == "mine" and read_meta(str(out))["num_docs"] == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["corpus", "src"]


def test_broken_tokenizer_json_is_one_line(corpus_dir, tmp_path, capsys):
    src, out = corpus_dir
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", broken')
    assert prepare_main([str(src), str(tmp_path / "new"), "--tokenizer", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == (f"ltrain-prepare: error: --tokenizer {bad} is not a valid tokenizer.json (key must be a string "
                   "at line 1 column 20), pass a file saved by the tokenizers library or 'byte'\n")
    assert not (tmp_path / "new").exists()


def test_prepare_to_a_read_only_filesystem_is_one_line(corpus_dir):
    """/sys refuses new entries even to root (chmod would not stop root)."""
    src, _ = corpus_dir
    proc = subprocess.run([BIN / "ltrain-prepare", str(src), "/sys/ltrain-test-corpus"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert one_line(proc.stderr).startswith("ltrain-prepare: error: cannot write /sys/ltrain-test-corpus: ")
    assert proc.stderr.rstrip().endswith("choose a writable output directory")


def test_token_ids_beyond_the_vocab_are_refused_before_training(tmp_path):
    """meta.json says vocab 100 but tokens.bin holds id 256 (<eos>): the embedding would
    raise IndexError mid-step; with max_id recorded by prepare it is one line up front."""
    src = tmp_path / "a.txt"
    src.write_text("hello world\n" * 200)
    out = tmp_path / "corpus"
    meta = prepare([str(src)], out).meta
    assert meta["max_id"] == 256
    meta["vocab_size"] = 100
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataConfigError, match=f"^data.path={out}: meta.json says vocab_size 100 but tokens.bin "
                                              "holds id 256; .*re-run ltrain-prepare --force$"):
        read_meta(str(out))
    del meta["max_id"]  # a corpus prepared before max_id was recorded: found by one pass
    (out / "meta.json").write_text(json.dumps(meta))
    with initialize_config_module("ltrain.conf", version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=[
            "data=memmap", f"data.path={out}", "data.seq_len=128", "model.vocab_size=200", "attention=dense"]))
    with pytest.raises(ConfigError, match=f"^model.vocab_size=200 is invalid: data.path={out} holds token id 256; "
                                          "set model.vocab_size >= 257$"):
        validate(cfg, world_size=1)


def test_hf_tokenizer_corpus_records_its_max_id(tmp_path):
    tok = write_word_tokenizer(tmp_path / "tok.json", ["hello", "world"])
    (tmp_path / "a.txt").write_text("hello hello world\n")
    meta = prepare([str(tmp_path / "a.txt")], tmp_path / "out", tokenizer=str(tok)).meta
    assert (meta["max_id"], meta["vocab_size"]) == (3, 4)
