"""The typed hand-offs between intake, worker, audit and API: round trip, refusal, earlier layout."""

from __future__ import annotations

import json

import pytest

from orthanc_plugin.core.handoff import HandoffError, JobInput, JobOutputs, RoleInput

from .jobs_helpers import outputs


def test_job_input_round_trips_through_json() -> None:
    original = JobInput(
        roles={
            "ct": RoleInput(series_id="s1", series_uid="1.2.3", instances=("a", "b"), reason="B40f first")
        },
        problem=None,
    )
    again = JobInput.from_json(json.loads(json.dumps(original.to_json())))
    assert again == original and again.roles["ct"].instances == ("a", "b")


def test_supersession_fields_are_written_only_when_set() -> None:
    first = JobInput(roles={"ct": RoleInput(series_id="s1", series_uid="1.2.3", instances=("a",))})
    # A first job's input is what the release before supersession wrote: older workers read it.
    assert set(first.to_json()) == {"version", "roles", "problem", "urgent"}
    later = JobInput(roles=first.roles, supersedes="0123", output_key="1.2|ct-lung|1|ab")
    assert later.to_json()["supersedes"] == "0123"
    assert JobInput.from_json(json.loads(json.dumps(later.to_json()))) == later


def test_job_outputs_round_trip_keeps_dicom_names() -> None:
    original = outputs(seg="1.2.3.4", sr="1.2.3.5")
    data = original.to_json()
    assert data["stored"]["seg"]["SOPInstanceUID"] == "1.2.3.4" and data["version"] == 2
    assert JobOutputs.from_json(json.loads(json.dumps(data))) == original


@pytest.mark.parametrize(
    ("record", "change", "expected"),
    [
        (JobInput, {"version": 2}, "field 'version'"),  # a newer writer: refuse, do not guess
        (JobInput, {"roles": {"ct": {"series_id": "s"}}}, "field 'roles.ct.series_uid'"),
        (JobInput, {"rolse": {}}, "field 'rolse'"),  # a field one side added and the other misses
    ],
)
def test_a_record_this_release_cannot_read_is_refused_naming_the_field(
    record: type[JobInput], change: dict[str, object], expected: str
) -> None:
    data = JobInput().to_json() | change
    with pytest.raises(HandoffError, match=expected):
        record.from_json(data)


def test_outputs_of_the_earlier_layout_are_read() -> None:
    earlier = {
        "seg": {"SOPInstanceUID": "1.1", "SeriesInstanceUID": "1.1.1", "ID": "o1", "ParentSeries": "p"},
        "sr": {"SOPInstanceUID": "1.2", "SeriesInstanceUID": "1.2.1", "ID": "o2", "ParentSeries": "p"},
        "measurements": [{"segment": "Right lung", "label": 1, "volume_ml": 2000.5}],
        "model": {"name": "ct_lung", "version": "1"},
        "volume": {"shape": [30, 512, 512], "spacing_mm": [8.0, 0.7, 0.7]},
        "inputs": {"channels": ["ct"], "grid": [64, 128, 128], "notes": []},
        "forward": None,
    }
    read = JobOutputs.from_json(earlier)
    assert list(read.stored) == ["seg", "sr"] and read.instance_ids() == ["o1", "o2"]
    assert read.measurements[0].volume_ml == 2000.5


def _stored(uid: str) -> dict[str, str]:
    return {"SOPInstanceUID": uid, "SeriesInstanceUID": uid + ".0", "ID": "o" + uid, "ParentSeries": "p"}


def test_outputs_version_1_are_read_and_version_2_holds_several_key_images() -> None:
    v1 = outputs(seg="1.1", sr="1.2").to_json() | {"version": 1}
    read = JobOutputs.from_json(v1)
    assert read.version == 1 and [k for k, _ in read.instances()] == ["seg", "sr"]
    v2 = v1 | {
        "version": 2,
        "stored": v1["stored"] | {"key_images": [_stored("1.3"), _stored("1.4")], "pdf": _stored("1.5")},
    }
    read = JobOutputs.from_json(json.loads(json.dumps(v2)))
    assert isinstance(read.stored["key_images"], tuple) and len(read.stored["key_images"]) == 2
    assert [k for k, _ in read.instances()] == ["seg", "sr", "key_images", "key_images", "pdf"]
    assert read.instance_ids()[-3:] == ["o1.3", "o1.4", "o1.5"]
    assert JobOutputs.from_json(read.to_json()) == read
    with pytest.raises(HandoffError, match="field 'version'"):
        JobOutputs.from_json(v2 | {"version": 3})  # a newer writer: refuse, do not guess
