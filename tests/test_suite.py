"""The committed shapes-61 benchmark suite: loads, keeps the paper's proportions, and is reproducible."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

from mrgd.layout import Edit
from mrgd.toyworld.world import BACKGROUNDS, QUALITY_WORDS

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "suites" / "shapes-61"
ROLE = {"add": "added", "remove": "removed", "attribute": "modified"}


def _generator():
    spec = importlib.util.spec_from_file_location("make_shapes_suite", ROOT / "benchmarks" / "make_shapes_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def suite():
    entries = json.loads((SUITE / "suite.json").read_text())
    return [(entry, Edit.load(SUITE / entry["file"])) for entry in entries]


def test_counts_per_task(suite):
    assert len(suite) == 61
    assert Counter(entry["task"] for entry, _ in suite) == {"add": 25, "remove": 24, "attribute": 12}
    assert {p.name for p in SUITE.glob("*.json")} == {entry["file"] for entry, _ in suite} | {"suite.json"}


def test_each_edit_matches_its_task(suite, tokenizer_dir):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    for entry, edit in suite:
        roles = Counter(edit.roles().values())
        assert roles == {"inherent": len(edit.regions) - 1, ROLE[entry["task"]]: 1}, entry["file"]
        assert tuple(edit.size) == (128, 128) and edit.steps == 20 and edit.guidance_scale == 7.0
        assert edit.mrgd.method == "mrgd"
        background, *objects = edit.regions
        assert background.kind == "background" and tuple(background.box) == (0, 0, 1, 1)
        assert background.prompt in BACKGROUNDS and background.role == "inherent"
        assert 1 <= len(objects) <= 4 and all(r.kind == "foreground" for r in objects)
        assert all(0.3 <= r.box[2] <= 0.5 and 0.3 <= r.box[3] <= 0.5 for r in objects)
        for region in objects:
            if region.role == "modified":  # a word swap keeps the token count
                assert len(tokenizer(region.prompt).input_ids) == len(tokenizer(region.target_prompt).input_ids)


def _overlaps(a, b) -> bool:
    return min(a[0] + a[2], b[0] + b[2]) > max(a[0], b[0]) and min(a[1] + a[3], b[1] + b[3]) > max(a[1], b[1])


def test_overlap_and_padding_quotas(suite):
    overlapping = padded = 0
    for _, edit in suite:
        objects = [r for r in edit.regions if r.kind == "foreground"]
        edited = next(r for r in objects if r.role != "inherent")
        overlapping += any(_overlaps(edited.box, r.box) for r in objects if r is not edited)
        prompts = [p for r in objects for p in (r.prompt, r.target_prompt) if p]
        padded += any(word in p for p in prompts for word in QUALITY_WORDS)
    assert overlapping >= len(suite) / 3
    assert padded >= len(suite) / 2


def test_generator_is_deterministic(tmp_path):
    entries = _generator().make_suite(tmp_path, seed=0)
    assert len(entries) == 61
    for path in SUITE.glob("*.json"):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


def _test_suite_generator():
    spec = importlib.util.spec_from_file_location("make_test_suite", ROOT / "benchmarks" / "make_test_suite.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, tuning", [("shapes-test-90", False), ("shapes-tune-60", True)])
def test_the_test_suite_and_its_tuning_twin_regenerate_and_never_share_unseen_fillers(tmp_path, name, tuning):
    from mrgd.toyworld.world import HELD_OUT_FILLERS, TEST_FILLERS

    module = _test_suite_generator()
    committed = ROOT / "benchmarks" / "suites" / name
    module.make_suite(tmp_path, module.TUNING_SETTINGS if tuning else module.SETTINGS)
    for path in committed.glob("*.json"):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
    suite = json.loads((committed / "suite.json").read_text())
    assert suite["role"] == ("tuning" if tuning else "test")
    overlapping = sum(entry["overlap"] for entry in suite["pairs"])
    assert overlapping >= len(suite["pairs"]) / 2
    text = " ".join(p for entry in suite["pairs"] for r in Edit.load(committed / entry["file"]).regions
                    for p in (r.prompt, r.target_prompt) if p)
    # the tuning twin pads with the keyword benchmark's held-out words, never with the test suite's unseen ones
    assert any(word in text for word in (HELD_OUT_FILLERS if tuning else TEST_FILLERS))
    assert not any(word in text for word in (TEST_FILLERS if tuning else HELD_OUT_FILLERS))


def test_the_separate_pairs_tuning_suite_regenerates_with_no_overlapping_pair(tmp_path):
    from mrgd.metrics import overlaps_inherent

    module = _test_suite_generator()
    committed = ROOT / "benchmarks" / "suites" / "shapes-tune-sep-60"
    module.main(["--tuning", "--seed", "52817", "--overlap-fraction", "0", "--out", str(tmp_path)])
    for path in committed.glob("*.json"):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
    pairs = json.loads((committed / "suite.json").read_text())["pairs"]
    assert len(pairs) == 60 and not any(overlaps_inherent(Edit.load(committed / p["file"])) for p in pairs)
    with pytest.raises(SystemExit):
        module.main(["--tuning", "--overlap-fraction", "1.5", "--out", str(tmp_path / "bad")])
