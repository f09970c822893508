"""`mrgd bench`: records, tables, contact sheets, resuming, and the same numbers when split over two processes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mrgd import bench
from conftest import run_cli
from mrgd.errors import InputError

GROUND = {"id": "ground", "kind": "background", "box": [0, 0, 1, 1]}
PAIRS = {
    "add-a": ("add", [{**GROUND, "prompt": "grass"}, {"id": "ball", "box": [0.1, 0.5, 0.4, 0.4], "prompt": "a red circle"},
                      {"id": "toy", "box": [0.55, 0.1, 0.4, 0.4], "target_prompt": "a purple star"}]),
    "remove-a": ("remove", [{**GROUND, "prompt": "sea"},
                            {"id": "rock", "box": [0.3, 0.3, 0.4, 0.4], "prompt": "an orange triangle", "target_prompt": None}]),
    "attr-a": ("attribute", [{**GROUND, "prompt": "sand"},
                             {"id": "kite", "box": [0.2, 0.2, 0.5, 0.5], "prompt": "a blue square",
                              "target_prompt": "a yellow square"}]),
}


@pytest.fixture(autouse=True)
def one_thread():
    # Two cores shared with other jobs: one thread per process is far faster than two fighting threads, and the
    # one-process reference then computes exactly as each of the two launched processes does.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_suite(folder: Path, names=tuple(PAIRS), with_listing: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, name in enumerate(names):
        task, regions = PAIRS[name]
        edit = {"size": [64, 64], "prompt": "masterpiece", "seed": 7 + i, "steps": 2, "regions": regions}
        (folder / f"{name}.json").write_text(json.dumps(edit))
        entries.append({"file": f"{name}.json", "task": task, "description": name})
    if with_listing:
        (folder / "suite.json").write_text(json.dumps(entries))
    return folder


@pytest.fixture()
def suite(tmp_path):
    return write_suite(tmp_path / "suite")


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory, tokenizer_dir):
    """A random tiny CLIP saved as a folder: a scorer for `--scorer` (its numbers mean nothing)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(5)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=4, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    folder = tmp_path_factory.mktemp("tiny-clip")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def count_edits(monkeypatch, pipe) -> list:
    calls = []
    original = pipe.edit

    def counting(edit, *args, **kwargs):
        calls.append(edit)
        return original(edit, *args, **kwargs)

    monkeypatch.setattr(pipe, "edit", counting)
    return calls


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------


def test_variants_and_suites(tmp_path, suite):
    assert [v.name for v in bench.variants()] == ["multidiffusion", "p2p", "mrgd"]
    chosen = bench.variants(["mrgd"], ablations=True)
    assert [v.overrides for v in chosen] == [
        {"method": "mrgd"}, {"method": "mrgd", "guidance": False}, {"method": "mrgd", "kssa": False},
        {"method": "mrgd", "use_total": False}, {"method": "mrgd", "keywords": 0}]
    with pytest.raises(InputError, match="unknown method 'sdedit'"):
        bench.parse_methods("mrgd,sdedit")
    pairs = bench.load_suite(suite)
    assert [(p.name, p.task) for p in pairs] == [("add-a", "add"), ("remove-a", "remove"), ("attr-a", "attribute")]
    assert pairs[0].edit_for(chosen[1]).mrgd.guidance is False and pairs[0].edit_for(chosen[1]).seed == 7
    assert [p.edit.steps for p in bench.load_suite(suite, steps=3)] == [3, 3, 3]
    # --limit takes pairs in turn from each task, so a short run still fills every column
    shutil.copy(suite / "add-a.json", suite / "add-b.json")
    listing = json.loads((suite / "suite.json").read_text())
    (suite / "suite.json").write_text(json.dumps([listing[0], {"file": "add-b.json", "task": "add"}, *listing[1:]]))
    assert [p.name for p in bench.load_suite(suite, limit=3)] == ["add-a", "remove-a", "attr-a"]
    assert [p.name for p in bench.load_suite(suite, limit=4)] == ["add-a", "add-b", "remove-a", "attr-a"]
    # a folder without suite.json: every edit file in it, the task read from the regions' roles
    bare = write_suite(tmp_path / "bare", with_listing=False)
    assert {p.name: p.task for p in bench.load_suite(bare)} == {"add-a": "add", "remove-a": "remove", "attr-a": "attribute"}
    with pytest.raises(InputError, match="--limit"):
        bench.load_suite(suite, limit=0)


def test_run_bench_writes_records_tables_sheets_and_resumes(monkeypatch, tmp_path, suite, tiny_pipe):
    out = tmp_path / "out"
    chosen = bench.variants(["multidiffusion", "mrgd"])
    calls = count_edits(monkeypatch, tiny_pipe)
    results = bench.run_bench(tiny_pipe, suite, out, chosen)
    assert len(calls) == 6
    records = lines(out / "records.jsonl")
    assert [(r["pair"], r["variant"]) for r in records] == [(p, v) for p in PAIRS for v in ("multidiffusion", "mrgd")]
    for record in records:
        assert record["clip"] is None and 0 < record["ssim_e"] <= 1 and 0 < record["ssim_i"] <= 1
        assert record["unet_calls"] > 0 and record["seconds"] > 0 and record["steps"] == 2
        with Image.open(out / record["target"]) as image:
            assert image.size == (64, 64)
        assert (out / f"images/{record['pair']}__{record['variant']}__source.png").exists()
    assert results == json.loads((out / "results.json").read_text())
    assert results["records"] == records
    assert results["summary"]["table"]["mrgd"]["remove"]["n"] == 1
    md = (out / "results.md").read_text()
    assert "add (1): CLIP / SSIM-e / SSIM-i" in md and "remove (1)" in md and "attribute (1)" in md
    assert "| MultiDiffusion |" in md and "| MRGD |" in md and "tiny" in md and "steps 2" in md
    assert "CLIP: n/a, no scorer" in md and "UNet calls / pair" in md
    for task in ("add", "remove", "attribute"):
        with Image.open(out / f"sheet-{task}.png") as sheet:
            assert sheet.width > 3 * 64 and sheet.height > 64  # source + two targets, one row

    # everything done: nothing runs again, the tables are rewritten
    (out / "results.md").unlink()
    again = bench.run_bench(tiny_pipe, suite, out, chosen)
    assert len(calls) == 6 and (out / "results.md").exists()
    assert again["records"] == records

    # an interrupted run: one record lost, the last line cut short; only that job runs again
    text = (out / "records.jsonl").read_text().splitlines()
    (out / "records.jsonl").write_text("\n".join(text[:-2]) + "\n" + text[-2][:40])
    bench.run_bench(tiny_pipe, suite, out, chosen)
    assert [(e.seed, e.mrgd.method) for e in calls[6:]] == [(9, "multidiffusion"), (9, "mrgd")]
    resumed = lines(out / "records.jsonl")
    assert [(r["pair"], r["variant"]) for r in resumed] == [(r["pair"], r["variant"]) for r in records]
    assert [r["ssim_e"] for r in resumed] == pytest.approx([r["ssim_e"] for r in records], abs=1e-6)


def test_a_variant_whose_settings_changed_runs_again_and_keeps_the_old_pictures(monkeypatch, tmp_path, suite, tiny_pipe):
    """Resuming goes by the edit a variant resolves to, not its name: a default changed between two runs (here the
    same name given other overrides) runs every job of it again; the old records and pictures stay."""
    out = tmp_path / "out"
    calls = count_edits(monkeypatch, tiny_pipe)
    first = bench.run_bench(tiny_pipe, suite, out, [bench.Variant("mrgd", "MRGD", {"method": "mrgd"})])
    changed = [bench.Variant("mrgd", "MRGD", {"method": "mrgd", "lambda_is": 0.5})]
    second = bench.run_bench(tiny_pipe, suite, out, changed)
    assert len(calls) == 6 and all(e.mrgd.lambda_is == 0.5 for e in calls[3:])
    assert [r["digest"] for r in second["records"]] != [r["digest"] for r in first["records"]]
    assert len(lines(out / "records.jsonl")) == 6  # the first run's records stay in the file, out of the tables
    for old, new in zip(first["records"], second["records"]):
        assert old["target"] != new["target"] and (out / old["target"]).exists() and (out / new["target"]).exists()
    bench.run_bench(tiny_pipe, suite, out, changed)  # now current: nothing runs
    assert len(calls) == 6


def test_scorer_fills_the_clip_column(tmp_path, suite, tiny_pipe, tiny_clip_dir):
    scorer, tokenizer = bench.load_scorer(str(tiny_clip_dir))
    results = bench.run_bench(tiny_pipe, suite, tmp_path / "out", bench.variants(["p2p"]), limit=2,
                              scorer=scorer, scorer_tokenizer=tokenizer, scorer_name="tiny-clip")
    for record in results["records"]:
        assert isinstance(record["clip"], float) and -100 <= record["clip"] <= 100
        assert set(record["clip_regions"]) == {"add-a": {"toy"}, "remove-a": {"rock"}}[record["pair"]]
    md = (tmp_path / "out" / "results.md").read_text()
    assert "no scorer" not in md and "`tiny-clip`" in md
    with pytest.raises(InputError, match="--scorer"):
        bench.load_scorer(str(tmp_path / "nothing-here"))


def test_summarise_and_markdown_layout(tmp_path):
    def record(pair, variant, task, clip, e, i, seconds=1.0, calls=10):
        return {"pair": pair, "variant": variant, "label": variant.upper(), "task": task, "clip": clip,
                "ssim_e": e, "ssim_i": i, "seconds": seconds, "unet_calls": calls, "steps": 20, "notes": []}

    records = [record("a1", "p2p", "add", 20.0, 0.5, 0.6), record("a2", "p2p", "add", None, 0.7, 0.8, 3.0, 20),
               record("r1", "p2p", "remove", 30.0, 0.25, 0.125), record("a1", "mrgd", "add", 22.0, 0.9, 0.95)]
    summary = bench.summarise(records)
    assert summary["tasks"] == ["add", "remove"] and summary["variants"] == ["p2p", "mrgd"]
    cell = summary["table"]["p2p"]["add"]
    assert cell == {"n": 2, "clip": 20.0, "ssim_e": pytest.approx(0.6), "ssim_i": pytest.approx(0.7),
                    "seconds": 2.0, "unet_calls": 15.0}
    assert summary["table"]["mrgd"]["remove"]["n"] == 0 and summary["cost"]["p2p"]["n"] == 3
    md = bench.write_markdown(summary, tmp_path / "r.md", config={"model": "m", "dtype": "float32"}, records=records)
    assert md == (tmp_path / "r.md").read_text()
    assert "| P2P | 20.00 / 0.6000 / 0.7000 | 30.00 / 0.2500 / 0.1250 |" in md
    assert "| MRGD | 22.00 / 0.9000 / 0.9500 | – |" in md
    assert "Model `m`, DDIM steps 20" in md


def test_cli_bench_and_bad_output_folders(capsys, tmp_path, suite, tiny_model_dir):
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "bench", suite, "-o", out, "--model", tiny_model_dir, "--methods", "p2p",
                                "--limit", "2")
    assert code == 0, err
    assert "2 pairs x 1 variants" in stdout and (out / "results.md").exists()
    assert len(lines(out / "records.jsonl")) == 2
    # resuming into the same folder needs no --force; other settings do not mix into it
    code, _, err = run_cli(capsys, "bench", suite, "-o", out, "--model", tiny_model_dir, "--methods", "p2p",
                           "--limit", "2")
    assert code == 0 and "2 of 2 jobs already done" in err
    code, _, err = run_cli(capsys, "bench", suite, "-o", out, "--model", tiny_model_dir, "--steps", "3")
    assert code == 2 and "steps" in err and err.count("\n") == 1
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for args, field in [(["-o", foreign], "records.jsonl"), (["-o", foreign / "notes.txt"], "not a folder"),
                        (["-o", tmp_path / "x", "--methods", "p2p,nope"], "--methods"),
                        (["-o", tmp_path / "x", "--limit", "0"], "--limit")]:
        code, _, err = run_cli(capsys, "bench", suite, *args, "--model", tiny_model_dir)
        assert code == 2 and field in err and err.count("\n") == 1, err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"] and not (tmp_path / "x").exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_give_the_one_process_results(capsys, tmp_path, suite, tiny_model_dir, tiny_clip_dir):
    args = [str(suite), "--model", str(tiny_model_dir), "--methods", "multidiffusion,mrgd", "--scorer", str(tiny_clip_dir)]
    code, _, err = run_cli(capsys, "bench", *args, "-o", tmp_path / "one")
    assert code == 0, err

    launcher = Path(sys.executable).with_name("accelerate")
    launch = [str(launcher), "launch"] if launcher.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    # `--cpu` alone starts a single process unless mpirun is set up; torchrun's launcher (--multi_gpu) with
    # ACCELERATE_USE_CPU=1 starts two CPU processes that meet over gloo.
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(bench.__file__).parents[1])}
    command = [*launch, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               "-m", "mrgd", "bench", *args, "-o", str(tmp_path / "two")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "[rank 0]" in done.stderr and "[rank 1]" in done.stderr  # really two processes
    assert done.stdout.count("wrote") == 1  # only the main process writes the tables

    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert not list((tmp_path / "two").glob("records.rank*.jsonl"))
    assert len(lines(tmp_path / "two" / "records.jsonl")) == 6
    assert [(r["pair"], r["variant"]) for r in two["records"]] == [(r["pair"], r["variant"]) for r in one["records"]]
    for a, b in zip(one["records"], two["records"]):
        assert a["unet_calls"] == b["unet_calls"]
        for metric in ("clip", "ssim_e", "ssim_i"):
            assert b[metric] == pytest.approx(a[metric], abs=1e-6), (a["pair"], a["variant"], metric)
    for name in ("sheet-add.png", "sheet-remove.png", "sheet-attribute.png", "results.md"):
        assert (tmp_path / "two" / name).exists()
    shutil.rmtree(tmp_path / "hf", ignore_errors=True)


def test_suite_listing_may_be_an_object_that_names_its_role(tmp_path):
    folder = write_suite(tmp_path / "s")
    entries = json.loads((folder / "suite.json").read_text())
    (folder / "suite.json").write_text(json.dumps({"role": "test", "about": "never tuned on", "pairs": entries}))
    assert [p.name for p in bench.load_suite(folder)] == ["add-a", "remove-a", "attr-a"]
    assert bench.suite_info(folder) == {"role": "test", "about": "never tuned on"}
    assert bench.suite_info(write_suite(tmp_path / "plain")) == {}
    (folder / "suite.json").write_text(json.dumps({"role": "test", "pairs": []}))
    with pytest.raises(InputError, match="non-empty list"):
        bench.load_suite(folder)


def test_summary_splits_each_task_into_overlapping_and_separate_pairs(tmp_path):
    def record(pair, variant, task, overlap, clip, e, i):
        return {"pair": pair, "variant": variant, "label": variant.upper(), "task": task, "clip": clip, "ssim_e": e,
                "ssim_i": i, "seconds": 1.0, "unet_calls": 10, "steps": 20, "notes": [], "overlap": overlap}

    records = [record("a1", "p2p", "add", True, 10.0, 0.5, 0.5), record("a2", "p2p", "add", True, 20.0, 0.7, 0.9),
               record("a3", "p2p", "add", False, 30.0, 0.25, 0.75), record("a1", "mrgd", "add", True, 40.0, 0.9, 0.8)]
    split = bench.summarise(records)["split"]
    assert split["p2p"]["add"]["overlap"] == {"n": 2, "clip": 15.0, "ssim_e": pytest.approx(0.6),
                                             "ssim_i": pytest.approx(0.7)}
    assert split["p2p"]["add"]["separate"] == {"n": 1, "clip": 30.0, "ssim_e": 0.25, "ssim_i": 0.75}
    assert split["mrgd"]["add"]["separate"]["n"] == 0
    md = bench.write_markdown(bench.summarise(records), tmp_path / "r.md", records=records,
                              suite={"role": "test", "about": "No default is tuned on it."})
    assert "| add, overlap | 2 | 15.00 / 0.6000 / 0.7000 | 40.00 / 0.9000 / 0.8000 |" in md
    assert "| add, separate | 1 | 30.00 / 0.2500 / 0.7500 | n/a / n/a / n/a |" in md
    assert "Suite role: **test**. No default is tuned on it." in md


def test_paired_differences_are_taken_pair_by_pair_with_an_interval_that_holds_the_mean(tmp_path):
    def record(pair, variant, overlap, clip, e=0.5, i=0.5):
        return {"pair": pair, "variant": variant, "label": variant.upper(), "task": "add", "clip": clip, "ssim_e": e,
                "ssim_i": i, "seconds": 1.0, "unet_calls": 10, "steps": 20, "notes": [], "overlap": overlap}

    # pairs differ a lot from each other but the variant is 1.5-4.5 points above mrgd on every one of them
    base = [10.0, 60.0, -20.0, 35.0]
    records = [record(f"a{k}", "mrgd", k < 2, clip) for k, clip in enumerate(base)]
    records += [record(f"a{k}", "fast", k < 2, clip + 1.5 + k, e=0.4) for k, clip in enumerate(base)]
    records.append(record("a9", "fast", False, 99.0))  # no mrgd record of this pair: not compared
    summary = bench.summarise(records)
    assert summary["reference"] == "mrgd"
    cell = summary["differences"]["fast"]["add"]["all"]
    assert cell["n"] == 4 and cell["clip"]["mean"] == pytest.approx(3.0)
    # deliberate: an interval over each variant's own CLIPs (spread 80) instead of the paired differences would reach
    # far past 1.5-4.5, and a degenerate one would not hold the mean strictly inside
    assert 1.5 <= cell["clip"]["low"] < 3.0 < cell["clip"]["high"] <= 4.5
    assert cell["ssim_e"]["mean"] == pytest.approx(-0.1) and cell["ssim_e"]["low"] == pytest.approx(-0.1)
    assert summary["differences"]["fast"]["add"]["overlap"]["clip"]["low"] is None  # 2 pairs: no interval
    md = bench.write_markdown(summary, tmp_path / "r.md", records=records)
    assert "| FAST | add | 4 | +3.00 [+" in md and "| FAST | add, overlap | 2 | +2.00 |" in md
    assert bench.summarise([r for r in records if r["variant"] == "fast"])["differences"] == {}
    lifts = [0.3, 5.1, -2.0, 7.7, 1.1, 0.0, 3.3, -4.2, 9.9]  # the interval must not hang on the records' order
    nine = [record(f"b{k}", "mrgd", False, 0.0) for k in range(9)]
    nine += [record(f"b{k}", "fast", False, lift) for k, lift in enumerate(lifts)]
    forward, backward = (bench.paired_differences(rs, "mrgd")["fast"]["add"]["all"]["clip"] for rs in (nine, nine[::-1]))
    assert forward == backward


def test_records_carry_the_overlap_class(tmp_path, tiny_pipe):
    regions = [{**GROUND, "prompt": "grass"}, {"id": "ball", "box": [0.1, 0.1, 0.4, 0.4], "prompt": "a red circle"},
               {"id": "toy", "box": [0.4, 0.4, 0.4, 0.4], "target_prompt": "a purple star"}]
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / "touch.json").write_text(json.dumps({"size": [64, 64], "seed": 1, "steps": 2, "regions": regions}))
    results = bench.run_bench(tiny_pipe, folder, tmp_path / "out", bench.variants(["multidiffusion"]))
    assert [r["overlap"] for r in results["records"]] == [True]
    assert results["summary"]["split"]["multidiffusion"]["add"]["overlap"]["n"] == 1


def test_image_paths_of_a_variant_named_after_a_folder_stay_in_images():
    from mrgd.bench import image_paths

    source, target = image_paths("add-00", "mrgd-guidance_vae/home/me/taesd")
    for path in (source, target):
        assert path.startswith("images/add-00__") and path.count("/") == 1
    assert image_paths("add-00", "mrgd")[0] == "images/add-00__mrgd__source.png"  # plain names unchanged


def test_pooled_differences_count_each_suites_pairs_once(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("pool", Path(__file__).parents[1] / "benchmarks" / "pool_differences.py")
    pool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pool)

    def record(pair, variant, clip):
        return {"pair": pair, "variant": variant, "task": "add", "clip": clip, "ssim_e": 0.5, "ssim_i": 0.5,
                "overlap": False}

    folders = [tmp_path / "a", tmp_path / "b"]
    for folder, lift in zip(folders, (1.0, 3.0)):  # the same pair names in both suites
        folder.mkdir()
        records = [r for k in range(3) for r in (record(f"add-{k}", "ref", 10.0 * k),
                                                 record(f"add-{k}", "new", 10.0 * k + lift))]
        (folder / "results.json").write_text(json.dumps({"records": records}))
        # an older run's record of the same job, kept in records.jsonl only, is not counted
        bench.append_record(folder / bench.RECORDS, record("add-0", "new", 99.0))
    table = pool.pooled_table(folders, "ref", ["new"])
    assert "| new | add | 6 | +2.00 [+1." in table


def test_cli_bench_compile_compiles_the_loaded_pipeline_once(capsys, tmp_path, suite, tiny_model_dir, monkeypatch):
    from mrgd.pipeline import MRGDPipeline
    from mrgd.web.runner import Runner

    calls = []
    monkeypatch.setattr(MRGDPipeline, "compile", lambda self, mode=None: calls.append(self.name) or 0)
    code, _, err = run_cli(capsys, "bench", suite, "-o", tmp_path / "out", "--model", tiny_model_dir, "--methods",
                           "p2p", "--limit", "1", "--compile")
    assert code == 0 and len(calls) == 1, err
    Runner(str(tiny_model_dir), "cpu", "float32", compile_unet=True)  # `mrgd serve --compile`
    assert len(calls) == 2
