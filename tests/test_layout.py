"""The edit file: roles, pairing by id, resolved round trips, one-line validation errors."""

import copy
import json
import random

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mrgd.errors import InputError
from mrgd.layout import Edit, Layout, Region, Settings

EXAMPLE = {  # design.md, "The edit file"
    "size": [256, 256],
    "prompt": "masterpiece, best quality, highly detailed",
    "negative_prompt": "",
    "seed": 7, "steps": 20, "guidance_scale": 7.0,
    "regions": [
        {"id": "ground", "kind": "background", "box": [0, 0, 1, 1], "prompt": "green grass"},
        {"id": "ball", "box": [0.1, 0.5, 0.3, 0.3], "prompt": "a red circle", "seed": 11},
        {"id": "kite", "box": [0.55, 0.1, 0.3, 0.3], "prompt": "a blue square", "target_prompt": "a yellow square"},
        {"id": "toy", "box": [0.6, 0.55, 0.3, 0.35], "target_prompt": "a purple star"},
        {"id": "rock", "box": [0.1, 0.1, 0.25, 0.25], "prompt": "an orange triangle", "target_prompt": None},
    ],
    "mrgd": {"method": "mrgd", "lambda_rs": 1000, "lambda_is": 2000, "lambda_ip": 300, "keywords": 15},
}
PLAIN = {**EXAMPLE, "regions": [r for r in EXAMPLE["regions"] if "target_prompt" not in r]}


def example(**changes):
    data = copy.deepcopy(EXAMPLE)
    data.update(changes)
    return data


def assert_one_line_error(call, *fragments):
    with pytest.raises(InputError) as caught:
        call()
    message = str(caught.value)
    assert message and len(message.splitlines()) == 1, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# --- roles and images ---------------------------------------------------------------------------------------------


def test_roles_of_the_design_example():
    edit = Edit.from_dict(EXAMPLE)
    assert edit.roles() == {"ground": "inherent", "ball": "inherent", "kite": "modified", "toy": "added",
                            "rock": "removed"}
    assert edit.is_edit and edit.has_structural_change
    assert edit.total_fraction == 0.6
    assert edit.regions_by_id()["ground"].control == "background"
    assert edit.mrgd.replace_fractions(edit.regions_by_id()["kite"].control) == (0.6, 0.3)
    assert edit.mrgd.replace_fractions("added") == (0.0, 0.0)


def test_source_and_target_images():
    edit = Edit.from_dict(EXAMPLE)
    source, target = edit.source(), edit.target()
    assert [r.id for r in source.regions] == ["ground", "ball", "kite", "rock"]
    assert [r.id for r in target.regions] == ["ground", "ball", "kite", "toy"]
    assert target.regions_by_id()["kite"].prompt == "a yellow square"
    assert source.regions_by_id()["ball"].seed == target.regions_by_id()["ball"].seed == 11
    assert (source.size, source.seed, source.steps) == ((256, 256), 7, 20)
    assert target.total_prompt() == (
        "masterpiece, best quality, highly detailed, green grass, a red circle, a yellow square, a purple star"
    )


def test_region_and_total_prompts_skip_empty_parts():
    layout = Layout.from_dict({"negative_prompt": "blurry", "regions": [
        {"id": "a", "box": [0, 0, 1, 1], "prompt": "sky", "negative_prompt": "clouds"},
        {"id": "b", "box": [0, 0, 0.5, 0.5], "prompt": ""},
    ]})
    a, b = layout.regions
    assert layout.total_prompt() == "sky"
    assert layout.region_prompt(a) == "sky" and layout.region_prompt(b) == ""
    assert layout.region_negative(a) == "blurry, clouds" and layout.region_negative(b) == "blurry"
    layout = layout.model_copy(update={"prompt": "best quality"})
    assert layout.region_prompt(a) == "best quality, sky"
    assert layout.total_prompt() == "best quality, sky"


def test_absent_null_and_equal_target_prompt():
    box = (0, 0, 1, 1)
    assert Region(id="a", box=box, prompt="x").role == "inherent"
    assert Region(id="a", box=box, prompt="x", target_prompt="x").role == "inherent"
    assert Region(id="a", box=box, prompt="x", target_prompt=None).role == "removed"
    assert Region(id="a", box=box, target_prompt="y").role == "added"
    assert Region(id="a", box=box, prompt=None, target_prompt="y").role == "added"
    # absent and explicit null must not compare equal
    assert Region(id="a", box=box, prompt="x") != Region(id="a", box=box, prompt="x", target_prompt=None)


@pytest.mark.parametrize("seed", range(5))
def test_pairing_is_by_id_not_position(seed):
    edit = Edit.from_dict(EXAMPLE)
    shuffled = example()
    random.Random(seed).shuffle(shuffled["regions"])
    other = Edit.from_dict(shuffled)
    assert other.roles() == edit.roles()
    for make in (Edit.source, Edit.target):
        assert sorted(make(other).regions, key=lambda r: r.id) == sorted(make(edit).regions, key=lambda r: r.id)
    # two separately written layouts, target in another order, pair up to the same edit
    target = edit.target().model_copy(update={"regions": random.Random(seed).sample(edit.target().regions, 4)})
    paired = Edit.from_layouts(edit.source(), target)
    assert paired.roles() == edit.roles()
    assert paired.regions_by_id() == edit.regions_by_id()


def test_from_layouts_refuses_a_moved_region():
    edit = Edit.from_dict(EXAMPLE)
    target = edit.target()
    target.regions[1] = target.regions[1].model_copy(update={"box": (0.2, 0.5, 0.3, 0.3)})
    assert_one_line_error(lambda: Edit.from_layouts(edit.source(), target), "target.regions[1].box", "'ball'")


def test_plain_layout_files(tmp_path):
    path = tmp_path / "layout.json"
    path.write_text(json.dumps(PLAIN))
    layout = Layout.load(path)
    assert [r.id for r in layout.regions] == ["ground", "ball"]
    edit = Edit.load(path)
    assert not edit.is_edit and edit.source() == edit.target() == layout
    assert Edit.from_layout(layout).roles() == {"ground": "inherent", "ball": "inherent"}
    assert Layout.from_dict(layout.to_dict()) == layout
    (tmp_path / "edit.json").write_text(json.dumps(EXAMPLE))
    assert_one_line_error(
        lambda: Layout.load(tmp_path / "edit.json"), "edit.json", "regions[2].target_prompt", "mrgd edit"
    )


# --- resolved round trip ------------------------------------------------------------------------------------------


def test_to_dict_is_resolved():
    resolved = Edit.from_dict(EXAMPLE).to_dict()
    regions = {r["id"]: r for r in resolved["regions"]}
    assert all("target_prompt" in r and "feather" in r for r in regions.values())
    assert regions["ground"]["target_prompt"] == "green grass"
    assert regions["rock"]["target_prompt"] is None and regions["toy"]["prompt"] is None
    assert resolved["mrgd"] == Settings(**EXAMPLE["mrgd"]).model_dump(mode="json")  # every default filled in
    assert resolved["mrgd"]["cross_replace"]["modified"] == 0.6


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_round_trip_through_files(tmp_path, suffix):
    edit = Edit.from_dict(EXAMPLE)
    path = tmp_path / f"edit{suffix}"
    edit.save(path)
    again = Edit.load(path)
    assert again == edit and again.roles() == edit.roles()
    assert again.to_dict() == edit.to_dict()
    assert Edit.from_dict(json.loads(json.dumps(edit.to_dict()))).to_dict() == edit.to_dict()


def test_yaml_input(tmp_path):
    path = tmp_path / "edit.yaml"
    path.write_text(yaml.safe_dump(EXAMPLE))
    assert Edit.load(path) == Edit.from_dict(EXAMPLE)


# --- validation: one line naming the field ------------------------------------------------------------------------


def region(index, **changes):
    data = example()
    data["regions"][index].update(changes)
    return data


INVALID = [
    (region(1, box=[0.1, 0.5, 0, 0.3]), "regions[1].box", "width must be > 0"),
    (region(1, box=[0.1, 0.5, 0.3, -1]), "regions[1].box", "height must be > 0"),
    (region(1, box=[-0.1, 0.5, 0.3, 0.3]), "regions[1].box", "x must be in [0, 1)"),
    (region(1, box=[0.1, 1.0, 0.3, 0.3]), "regions[1].box", "y must be in [0, 1)"),
    (region(1, box=[0.1, 0.5, 0.3]), "regions[1].box", ""),
    (region(1, box=[0.1, 0.5, float("nan"), 0.3]), "regions[1].box[2]", "finite"),
    (region(1, feather=1.5), "regions[1].feather", "less than or equal to 1"),
    (region(1, kind="middle"), "regions[1].kind", "'background' or 'foreground'"),
    (region(1, keywords="red"), "regions[1].keywords", "list"),
    (region(1, promt="a red circle"), "regions[1].promt", "unknown field"),
    (region(1, id=""), "regions[1].id", "must not be empty"),
    (region(1, seed=-3), "regions[1].seed", "greater than or equal to 0"),
    (region(3, target_prompt=None), "regions[3]", "needs a prompt"),
    (region(1, id="ground"), "regions", "duplicate id 'ground' at [0] and [1]"),
    (example(size=[100, 128]), "size", "use a multiple of 8, e.g. 128"),
    (example(size=[128, 0]), "size", "use a multiple of 8, e.g. 128"),
    (example(size=[128]), "size", ""),
    (example(steps=0), "steps", "greater than or equal to 1"),
    (example(steps=1001), "steps", "less than or equal to 1000"),
    (example(guidance_scale=-1), "guidance_scale", "greater than or equal to 0"),
    (example(seed="seven"), "seed", "valid integer"),
    (example(colour="red"), "colour", "unknown field"),
    (example(mrgd={"lambda_r": 1}), "mrgd.lambda_r", "unknown field"),
    (example(mrgd={"method": "sdedit"}), "mrgd.method", "'multidiffusion', 'p2p' or 'mrgd'"),
    (example(mrgd={"keywords": -1}), "mrgd.keywords", "greater than or equal to 0"),
    (example(mrgd={"guidance_every": 0}), "mrgd.guidance_every", "greater than or equal to 1"),
    (example(mrgd={"self_replace": {"total": 2}}), "mrgd.self_replace.total", "less than or equal to 1"),
    (example(mrgd={"keyword_steps": [10, 0]}), "mrgd.keyword_steps[1]", "greater than or equal to 1"),
    (example(regions={"id": "a"}), "regions", "list"),
    ([EXAMPLE], "top level", "dictionary"),
]


@pytest.mark.parametrize(("data", "field", "text"), INVALID)
def test_invalid_input_is_one_line_naming_the_field(data, field, text):
    message = assert_one_line_error(lambda: Edit.from_dict(data, source="edit.json"), text)
    assert message.startswith(f"edit.json: {field}:"), message


def test_a_box_reaching_past_the_canvas_is_allowed():
    edit = Edit.from_dict(region(1, box=[0.8, 0.9, 0.5, 2]))
    assert edit.regions[1].box == (0.8, 0.9, 0.5, 2.0)


@pytest.mark.parametrize(("name", "text", "fragments"), [
    ("edit.json", '{"size": [128, 128],\n "regions": [\n  {"id": "a",, }]}', ["edit.json", "line 3", "invalid JSON"]),
    ("edit.yaml", "size: [128, 128]\nregions:\n  - id: a\n   box: [0, 0, 1, 1]\n",
     ["edit.yaml", "line 4", "invalid YAML"]),
    ("edit.yml", "- 1\n- 2\n", ["edit.yml", "mapping"]),
    ("edit.json", "", ["edit.json", "line 1"]),
    ("edit.txt", "{}", ["edit.txt", ".json, .yaml or .yml"]),
    ("edit.json", '{"seed": ' + "9" * 5000 + "}", ["edit.json", "cannot parse"]),
    ("edit.json", '{"regions": [{"id": "a", "box": [0, 0, 1, 1], "prompt": "x", "feather": 2}]}',
     ["edit.json: regions[0].feather:"]),
])
def test_file_errors(tmp_path, name, text, fragments):
    path = tmp_path / name
    path.write_text(text)
    assert_one_line_error(lambda: Edit.load(path), *fragments)


def test_missing_and_unreadable_files(tmp_path):
    assert_one_line_error(lambda: Edit.load(tmp_path / "nope.json"), "nope.json", "not found")
    (tmp_path / "bad.json").write_bytes(b'{"prompt": "\xff"}')
    assert_one_line_error(lambda: Edit.load(tmp_path / "bad.json"), "bad.json", "UTF-8")
    (tmp_path / "dir.json").mkdir()
    assert_one_line_error(lambda: Edit.load(tmp_path / "dir.json"), "dir.json", "cannot read")


# --- fuzzing: nothing but InputError escapes, always one line -----------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
REGION_FIELDS = ["id", "kind", "box", "prompt", "target_prompt", "negative_prompt", "keywords", "feather", "seed",
                 "other"]
TOP_FIELDS = ["size", "prompt", "negative_prompt", "seed", "steps", "guidance_scale", "regions", "mrgd", "other"]
SETTINGS_FIELDS = [*Settings.model_fields, "other"]


def check(data):
    """Validation either succeeds and round-trips, or raises a one-line InputError."""
    try:
        edit = Edit.from_dict(data, source="fuzz.json")
    except InputError as err:
        assert len(str(err).splitlines()) == 1
        return
    resolved = edit.to_dict()
    assert Edit.from_dict(resolved) == edit and Edit.from_dict(resolved).to_dict() == resolved


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(where=st.sampled_from(["top", "region", "mrgd"]), index=st.integers(0, 4), value=json_values,
       field=st.data())
def test_fuzz_one_field(where, index, value, field):
    data = example()
    if where == "top":
        data[field.draw(st.sampled_from(TOP_FIELDS))] = value
    elif where == "region":
        data["regions"][index][field.draw(st.sampled_from(REGION_FIELDS))] = value
    else:
        data["mrgd"][field.draw(st.sampled_from(SETTINGS_FIELDS))] = value
    check(data)


@FUZZ
@given(st.dictionaries(st.sampled_from(TOP_FIELDS), json_values, max_size=6) | json_values)
def test_fuzz_whole_documents(data):
    check(data)


boxes = st.lists(st.floats(-0.5, 1.5) | st.integers(-1, 2), min_size=4, max_size=4)
regions = st.fixed_dictionaries(
    {"id": st.sampled_from(["a", "b", "c", ""]), "box": boxes},
    optional={"prompt": st.none() | st.text(max_size=5), "target_prompt": st.none() | st.text(max_size=5),
              "kind": st.sampled_from(["background", "foreground", "x"]), "feather": st.floats(-1, 2),
              "seed": st.none() | st.integers(-2, 2**64)},
)


@FUZZ
@given(st.lists(regions, max_size=4), st.lists(st.integers(-8, 300), min_size=2, max_size=2))
def test_fuzz_plausible_edits(region_list, size):
    check({"size": size, "regions": region_list})


@FUZZ
@given(text=st.text(max_size=200) | st.sampled_from(['{"regions": [', "a: [", "{}", "regions: 3", "[]"]),
       suffix=st.sampled_from([".json", ".yaml"]))
def test_fuzz_files(tmp_path_factory, text, suffix):
    path = tmp_path_factory.getbasetemp() / f"fuzz{suffix}"
    path.write_text(text, encoding="utf-8")
    try:
        Edit.load(path)
    except InputError as err:
        assert len(str(err).splitlines()) == 1


@settings(max_examples=100, deadline=None)
@given(st.text(st.characters(blacklist_categories=["Cs"]), max_size=20))
def test_any_prompt_text_round_trips_through_yaml_and_json(tmp_path_factory, prompt):
    edit = Edit.from_dict(example(prompt=prompt))
    for suffix in (".json", ".yaml"):
        path = tmp_path_factory.getbasetemp() / f"prompt{suffix}"
        edit.save(path)
        assert Edit.load(path) == edit


def test_keyword_count_is_per_region_and_reaches_both_images():
    from mrgd.layout import Edit

    edit = Edit.from_dict({"regions": [
        {"id": "bg", "kind": "background", "box": [0, 0, 1, 1], "prompt": "grass", "keyword_count": 1},
        {"id": "a", "box": [0.1, 0.1, 0.3, 0.3], "prompt": "a red circle", "target_prompt": "a blue circle"},
    ]})
    assert [r.keyword_count for r in edit.source().regions] == [1, None]
    assert [r.keyword_count for r in edit.target().regions] == [1, None]
    with pytest.raises(InputError, match="keyword_count"):
        Edit.from_dict({"regions": [{"id": "a", "box": [0, 0, 1, 1], "prompt": "x", "keyword_count": -1}]})
