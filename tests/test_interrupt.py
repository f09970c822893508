"""Ctrl-C: no staging folder left, a one-line message and exit code 130, the UNet's own attention processors back,
and a bench that resumes where it stopped."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import THREE_REGION_EDIT
from conftest import run_cli as run
from mrgd.layout import Edit

MRGD = Path(sys.executable).with_name("mrgd")


def test_sigint_during_edit_leaves_nothing_and_exits_130(tmp_path, tiny_model_dir):
    edit = {**THREE_REGION_EDIT, "steps": 900, "mrgd": {"method": "p2p"}}  # far longer than the test waits
    (tmp_path / "edit.json").write_text(json.dumps(edit))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MRGD_DEBUG", None)
    command = [str(MRGD), "edit", str(tmp_path / "edit.json"), "-o", str(out), "--model", str(tiny_model_dir)]
    # a shell without job control starts background jobs with SIGINT ignored, and children inherit that: give the
    # edit the default disposition, as a terminal's foreground command has, whatever ran these tests
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    stage = tmp_path / f".out.partial-{process.pid}"
    deadline = time.monotonic() + 120
    while not stage.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stage.exists(), "the edit never started staging its outputs"
    time.sleep(3)  # into the model loading or the denoising loop
    assert process.poll() is None, "the edit finished before it could be interrupted"
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.splitlines() == [f"mrgd: interrupted; nothing was written to {out}"], stderr
    assert stdout == "" and sorted(p.name for p in tmp_path.iterdir()) == ["edit.json"]


def test_ctrl_c_during_invert_into_an_existing_folder_keeps_it_as_it_was(capsys, monkeypatch, tmp_path,
                                                                         tiny_model_dir):
    from PIL import Image

    import mrgd.inversion

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mrgd.inversion, "invert", interrupted)
    Image.new("RGB", (64, 64), "green").save(tmp_path / "photo.png")
    (tmp_path / "edit.json").write_text(json.dumps({**THREE_REGION_EDIT, "steps": 2}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "target.png").write_text("an earlier run")
    code, stdout, err = run(capsys, "invert", tmp_path / "photo.png", tmp_path / "edit.json", "-o", out,
                            "--model", tiny_model_dir, "--force")
    assert code == 130 and err == f"mrgd: interrupted; {out} was left as it was\n" and stdout == ""
    assert [p.name for p in out.iterdir()] == ["target.png"] and (out / "target.png").read_text() == "an earlier run"


def test_ctrl_c_outside_a_command_s_outputs_is_exit_130(capsys, monkeypatch, tmp_path):
    import mrgd.webui_import

    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(mrgd.webui_import, "load_webui", interrupted)
    code, _, err = run(capsys, "import-webui", tmp_path / "config.json", "-o", tmp_path / "edit.json")
    assert code == 130 and err == "mrgd: interrupted\n"


def test_attention_processors_are_restored_after_ctrl_c(tiny_pipe):
    edit = Edit.from_dict({**THREE_REGION_EDIT, "steps": 4, "mrgd": {"method": "p2p"}})
    before = {name: type(p) for name, p in tiny_pipe.unet.attn_processors.items()}
    calls = []

    def ctrl_c(state):
        calls.append(state["step"])
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tiny_pipe.edit(edit, callback=ctrl_c)
    assert len(calls) == 2
    assert {name: type(p) for name, p in tiny_pipe.unet.attn_processors.items()} == before
    assert "ControlledAttnProcessor" not in {t.__name__ for t in before.values()}
    tiny_pipe.edit(Edit.from_dict({**THREE_REGION_EDIT, "steps": 2}))  # and the pipeline still works


def test_bench_resumes_where_ctrl_c_stopped_it(capsys, monkeypatch, tmp_path, tiny_model_dir):
    import mrgd.bench

    suite = tmp_path / "suite"
    suite.mkdir()
    for name, regions in (("add", THREE_REGION_EDIT["regions"][:1] + THREE_REGION_EDIT["regions"][3:4]),
                          ("recolour", THREE_REGION_EDIT["regions"][:1] + THREE_REGION_EDIT["regions"][2:3])):
        (suite / f"{name}.json").write_text(json.dumps({**THREE_REGION_EDIT, "regions": regions}))
    real_job = mrgd.bench.run_job
    jobs = []

    def job_then_ctrl_c(*args, **kwargs):
        jobs.append(args[1].name)
        if len(jobs) == 3:
            raise KeyboardInterrupt
        return real_job(*args, **kwargs)

    monkeypatch.setattr(mrgd.bench, "run_job", job_then_ctrl_c)
    out = tmp_path / "bench"
    args = ["bench", suite, "-o", out, "--model", tiny_model_dir, "--steps", "2", "--methods", "multidiffusion,p2p"]
    code, _, err = run(capsys, *args)
    assert code == 130
    resume = "run the same command again to resume"
    assert err.splitlines()[-1] == f"mrgd: interrupted; {out} keeps the finished jobs: {resume}"
    finished = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [(r["pair"], r["variant"]) for r in finished] == [("add", "multidiffusion"), ("add", "p2p")]
    assert not (out / "results.md").exists()

    code, _, err = run(capsys, *args)
    assert code == 0, err
    assert "resuming: 2 of 4 jobs already done" in err
    assert jobs[3:] == ["recolour", "recolour"]  # only the jobs that had not finished ran again
    records = json.loads((out / "results.json").read_text())["records"]
    assert len(records) == 4 and (out / "results.md").exists()
