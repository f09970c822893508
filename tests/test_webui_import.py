"""The WebUI extension's {"bbox_controls": [...]} files, classified by blend mode."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mrgd.errors import InputError
from mrgd.webui_import import import_webui, load_webui


def entry(mode, prompt="", x=0.1, y=0.1, w=0.3, h=0.3, **extra):
    return {"enable": True, "x": x, "y": y, "w": w, "h": h, "prompt": prompt, "neg_prompt": "",
            "blend_mode": mode, "feather_ratio": 0.2, "seed": -1, "key_prompt": "", **extra}


EVERY_MODE = {"bbox_controls": [
    entry("Background", "green grass", x=0, y=0, w=1, h=1, feather_ratio=0.1),
    entry("EditedSource", "a blue square", x=0.55, key_prompt="square, blue", seed=5),
    entry("EditedTarget", "a yellow square", x=0.55, key_prompt="yellow, square"),
    entry("Foreground", "a red circle", y=0.5, seed=11, neg_prompt="blurry"),
    entry("AdditionForeground", "a purple star", x=0.6, y=0.55, h=0.35),
    entry("RemovalForeground", "an orange triangle", w=0.25, h=0.25),
    entry("Foreground", "a ghost", enable=False),
    entry("Foreground", "a line", w=0),
    entry("Foreground", "off canvas", x=1.2),
]}


def assert_one_line_error(call, *fragments):
    with pytest.raises(InputError) as caught:
        call()
    message = str(caught.value)
    assert len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, message


def test_every_blend_mode():
    edit, warnings = import_webui(EVERY_MODE, prompt="best quality", seed=3, size=(512, 384))
    assert edit.roles() == {"background-0": "inherent", "edit-1": "modified", "fg-3": "inherent",
                            "add-4": "added", "remove-5": "removed"}
    regions = edit.regions_by_id()
    assert regions["background-0"].kind == "background" and regions["background-0"].feather == 0.1
    assert regions["edit-1"].prompt == "a blue square"
    assert regions["edit-1"].target_prompt == "a yellow square"
    assert regions["edit-1"].box == (0.55, 0.1, 0.3, 0.3)
    assert regions["edit-1"].keywords == ["square", "blue", "yellow"]
    assert regions["edit-1"].seed == 5 and regions["fg-3"].seed == 11 and regions["add-4"].seed is None
    assert regions["fg-3"].negative_prompt == "blurry"
    assert regions["add-4"].prompt is None and regions["add-4"].target_prompt == "a purple star"
    assert regions["remove-5"].target_prompt is None
    assert (edit.size, edit.prompt, edit.seed) == ((512, 384), "best quality", 3)
    assert len(warnings) == 3
    for index, reason in [(6, "disabled"), (7, "degenerate"), (8, "degenerate")]:
        assert any(f"bbox_controls[{index}]" in w and reason in w for w in warnings), warnings


def test_edit_pair_that_is_not_last_keeps_every_other_region():
    edit, _ = import_webui(EVERY_MODE)
    assert [r.id for r in edit.target().regions] == ["background-0", "edit-1", "fg-3", "add-4"]
    assert [r.id for r in edit.source().regions] == ["background-0", "edit-1", "fg-3", "remove-5"]


def test_missing_seed_and_keywords():
    data = {"bbox_controls": [{"x": 0, "y": 0, "w": 1, "h": 1, "prompt": "sky", "blend_mode": "Background"}]}
    edit, warnings = import_webui(data)
    assert edit.regions[0].seed is None and edit.regions[0].keywords == [] and warnings == []


def test_a_box_partly_off_canvas_keeps_its_visible_part():
    edit, _ = import_webui({"bbox_controls": [entry("Foreground", "x", x=-0.25, y=0.5, w=0.5, h=0.2)]})
    assert edit.regions[0].box == (0.0, 0.5, 0.25, 0.2)


def test_edit_pair_pairs_across_the_entries_between():
    # the research code's region configs: a Foreground entry inside an EditedSource / EditedTarget pair
    data = {"bbox_controls": [entry("Background", "grass", x=0, y=0, w=1, h=1), entry("EditedSource", "a red car"),
                              entry("Foreground", "a tree", x=0.6), entry("EditedTarget", "a blue car")]}
    edit, warnings = import_webui(data)
    assert edit.roles() == {"background-0": "inherent", "edit-1": "modified", "fg-2": "inherent"}
    assert edit.regions_by_id()["edit-1"].target_prompt == "a blue car" and warnings == []


def test_edit_pairs_take_the_next_free_target_and_warn_when_boxes_differ():
    data = {"bbox_controls": [entry("EditedSource", "a cat"), entry("EditedSource", "a dog", x=0.5),
                              entry("EditedTarget", "a fox", y=0.2), entry("EditedTarget", "a wolf", x=0.5)]}
    edit, warnings = import_webui(data)
    regions = edit.regions_by_id()
    assert edit.roles() == {"edit-0": "modified", "edit-1": "modified"}
    assert (regions["edit-0"].target_prompt, regions["edit-1"].target_prompt) == ("a fox", "a wolf")
    assert regions["edit-0"].box == (0.1, 0.1, 0.3, 0.3)  # the pair takes the EditedSource's box
    assert len(warnings) == 1
    assert "bbox_controls[0]" in warnings[0] and "bbox_controls[2]" in warnings[0] and "differ" in warnings[0]


def test_identical_edit_prompts_warn():
    edit, warnings = import_webui({"bbox_controls": [entry("EditedSource", "a cat"), entry("EditedTarget", "a cat")]})
    assert edit.roles() == {"edit-0": "inherent"} and "identical" in warnings[0]


@pytest.mark.parametrize(("controls", "fragments"), [
    ([entry("Background"), entry("EditedSource", "a")], ["bbox_controls[1]", "EditedTarget"]),
    ([entry("EditedTarget", "b"), entry("Background")], ["bbox_controls[0]", "EditedSource"]),
    ([entry("EditedSource", "a"), entry("EditedTarget", "b"), entry("EditedTarget", "c")], ["bbox_controls[2]"]),
    ([entry("EditedSource", "a"), entry("EditedTarget", "b", enable=False)], ["bbox_controls[0]"]),
    ([entry("Background"), entry("Sideways")], ["bbox_controls[1].blend_mode", "'Sideways'", "Foreground"]),
    ([entry(["Foreground"])], ["bbox_controls[0].blend_mode"]),
    ([entry("Foreground", x="left")], ["bbox_controls[0].x", "number"]),
    ([entry("Foreground", w=float("nan"))], ["bbox_controls[0].w", "number"]),
    ([entry("Foreground", prompt=3)], ["bbox_controls[0].prompt", "text"]),
    ([entry("Foreground", feather_ratio=3)], ["bbox_controls[0]", "feather"]),
    ([entry("Foreground", seed=-7)], ["bbox_controls[0]", "seed"]),
    ([7], ["bbox_controls[0]"]),
])
def test_bad_entries_name_the_entry(controls, fragments):
    assert_one_line_error(lambda: import_webui({"bbox_controls": controls}), *fragments)


def test_bad_canvas_arguments():
    assert_one_line_error(lambda: import_webui({"bbox_controls": []}, size=(500, 512)), "size", "multiple of 8")


def test_load_webui(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(EVERY_MODE))
    assert load_webui(path) == EVERY_MODE
    assert_one_line_error(lambda: load_webui(tmp_path / "none.json"), "none.json", "not found")
    path.write_text('{"bbox_controls": [')
    assert_one_line_error(lambda: load_webui(path), "config.json", "invalid JSON")
    path.write_text('{"controls": []}')
    assert_one_line_error(lambda: load_webui(path), "config.json", "bbox_controls")


scalars = st.none() | st.booleans() | st.integers(-3, 3) | st.floats() | st.text(max_size=6) | st.just([])
entries = st.fixed_dictionaries(
    {"blend_mode": st.sampled_from(["Background", "Foreground", "AdditionForeground", "RemovalForeground",
                                    "EditedSource", "EditedTarget", "Other"])},
    optional={key: scalars | st.floats(-0.5, 1.5) for key in
              ["enable", "x", "y", "w", "h", "prompt", "neg_prompt", "feather_ratio", "seed", "key_prompt"]},
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(entries | scalars, max_size=6) | scalars)
def test_fuzz_import(controls):
    try:
        edit, warnings = import_webui({"bbox_controls": controls})
    except InputError as err:
        assert len(str(err).splitlines()) == 1
        return
    assert all(len(w.splitlines()) == 1 for w in warnings)
    assert len(edit.regions) <= len(controls)
