"""The file domain: upload plans within S3's multipart rules, validation, settling, download names."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from medmesh.runtime.errors import InvalidArgument
from services.file.domain import (
    GIB,
    MAX_PART_SIZE,
    MAX_PARTS,
    MAX_PLANNED_PARTS,
    MIB,
    DeviceAssignment,
    Ending,
    File,
    FileDraft,
    FilePolicy,
    FileState,
    Settlement,
    UploadPlan,
    content_disposition,
    covers_plan,
    new_file,
    parse_name,
    parse_parent,
    plan_upload,
    request_key,
    require_organization,
    require_parts,
    url_lifetime,
)

AT = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DIGEST = "ab" * 32
POLICY = FilePolicy()


def a_file(**changes: object) -> File:
    draft = FileDraft(content_type="image/png", size_bytes=10, sha256=DIGEST, display_name="x.png")
    file = new_file(draft, "organizations/a", AT, POLICY, requester="organizations/a/users/u", file_id="f1")
    return File(**{**file.__dict__, **changes})  # type: ignore[arg-type]


# --- plans ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "part_size", "parts"),
    [
        (0, 0, 0),
        (64 * MIB - 1, 0, 0),  # below the threshold: one PUT
        (64 * MIB, 16 * MIB, 4),
        (100 * MIB, 16 * MIB, 7),  # the last part is shorter
        (5 * GIB, 16 * MIB, 320),
        (15 * GIB, 16 * MIB, 960),
        # 16 MiB parts would need 12,800 parts: grown, in whole MiB, to stay within 1,000.
        (200 * GIB, 205 * MIB, 1000),
        (5 * 1024 * GIB, 525 * MIB, 9987),  # S3's largest object: 1,000 parts would be too large
    ],
)
def test_plan_upload(size: int, part_size: int, parts: int) -> None:
    plan = plan_upload(size, POLICY)

    assert (plan.part_size, plan.part_count, plan.multipart) == (part_size, parts, part_size > 0)
    if plan.multipart:
        assert plan.part_count <= (MAX_PLANNED_PARTS if size <= 200 * GIB else MAX_PARTS)
        assert plan.part_size <= MAX_PART_SIZE
        assert (plan.part_count - 1) * plan.part_size < size <= plan.part_count * plan.part_size


def test_a_twelve_megabyte_file_in_five_mebibyte_parts() -> None:
    plan = plan_upload(12_000_000, FilePolicy(multipart_threshold=5 * MIB, part_size=5 * MIB))

    assert (plan.part_size, plan.part_count) == (5 * MIB, 3)


# --- new files -----------------------------------------------------------------------------------


def test_new_file() -> None:
    draft = FileDraft(
        content_type=" Image/PNG ",
        size_bytes=10,
        sha256=DIGEST.upper(),
        display_name="  x.png ",
        device="devices/SN-1",
        patient="organizations/a/patients/p1",
        session="devices/SN-1/sessions/s1",
    )

    file = new_file(draft, "organizations/a", AT, POLICY, requester="devices/SN-1", request_id="m1", file_id="f1")

    assert file == File(
        id="f1",
        organization="organizations/a",
        display_name="x.png",
        content_type="image/png",
        size_bytes=10,
        sha256=DIGEST,
        device="devices/SN-1",
        patient="organizations/a/patients/p1",
        session="devices/SN-1/sessions/s1",
        state=FileState.PENDING,
        failure_reason="",
        create_time=AT,
        complete_time=None,
        upload_expire_time=AT + timedelta(hours=24),
        object_key="a/f1",
        upload_id="",
        part_size=0,
        request_key="organizations/a|devices/SN-1|m1",
    )
    assert file.name == "files/f1"
    assert file.matches(draft)
    assert not file.matches(FileDraft(content_type="image/png", size_bytes=11, sha256=DIGEST, display_name="x.png"))


def test_a_file_without_request_id_has_a_unique_request_key() -> None:
    assert request_key("organizations/a", "u", "", "f1") == "|f1"
    assert a_file().request_key == "|f1"


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"size_bytes": -1}, "file.size_bytes"),
        ({"size_bytes": POLICY.max_bytes + 1}, "file.size_bytes"),
        ({"content_type": "text/html"}, "file.content_type"),
        ({"content_type": "image"}, "file.content_type"),
        ({"sha256": "g" * 64}, "file.sha256"),
        ({"display_name": "x" * 201}, "file.display_name"),
        ({"display_name": "tab\there"}, "file.display_name"),
        ({"device": "SN-1"}, "file.device"),
        ({"patient": "organizations/b/patients/p1"}, "file.patient"),
        ({"patient": "patients/p1"}, "file.patient"),
        ({"session": "/leading-slash"}, "file.session"),
    ],
)
def test_new_file_refuses(changes: dict[str, object], field: str) -> None:
    values: dict[str, object] = {"content_type": "image/png", "size_bytes": 10, "sha256": DIGEST}
    draft = FileDraft(**{**values, **changes})  # type: ignore[arg-type]

    with pytest.raises(InvalidArgument) as invalid:
        new_file(draft, "organizations/a", AT, POLICY, requester="u")

    assert [v.field for v in invalid.value.field_violations] == [field]


def test_allowed_types_come_from_the_policy() -> None:
    draft = FileDraft(content_type="text/html", size_bytes=1, sha256=DIGEST)
    policy = FilePolicy(allowed_types=frozenset({"text/html"}))

    assert new_file(draft, "organizations/a", AT, policy, requester="u").content_type == "text/html"


# --- names ---------------------------------------------------------------------------------------


def test_names() -> None:
    assert parse_name("files/abc123") == "abc123"
    assert parse_parent("organizations/-") == "organizations/-"
    assert require_organization("organizations/a") == "organizations/a"
    for bad in ("files/", "files/ABC", "devices/x", "files/a/b"):
        with pytest.raises(InvalidArgument):
            parse_name(bad)
    for bad in ("organizations/-", "organizations/", "orgs/a"):
        with pytest.raises(InvalidArgument):
            require_organization(bad)


# --- parts ---------------------------------------------------------------------------------------


def test_require_parts_sorts_and_unquotes() -> None:
    plan = UploadPlan(25, 10)

    assert require_parts([(3, '"c"'), (1, "a"), (2, ' "b" ')], plan) == [(1, "a"), (2, "b"), (3, "c")]
    assert covers_plan([(2, "b"), (1, "a"), (3, "c")], plan)
    assert not covers_plan([(1, "a"), (3, "c")], plan)


@pytest.mark.parametrize("parts", [[(1, "a"), (2, "b")], [(1, "a"), (1, "a"), (2, "b"), (3, "c")], [(4, "d")]])
def test_require_parts_wants_each_part_once(parts: list[tuple[int, str]]) -> None:
    with pytest.raises(InvalidArgument):
        require_parts(parts, UploadPlan(25, 10))


def test_a_single_put_has_no_parts() -> None:
    assert require_parts([], UploadPlan(25)) == []
    with pytest.raises(InvalidArgument):
        require_parts([(1, "a")], UploadPlan(25))


# --- settling ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ending", "reason"), [(Ending.AVAILABLE, ""), (Ending.FAILED, "SIZE_MISMATCH")])
def test_settled(ending: Ending, reason: str) -> None:
    later = AT + timedelta(minutes=3)

    file = a_file().settled(Settlement("f1", ending, reason, later))

    assert (file.state.value, file.failure_reason, file.complete_time, file.revision) == (
        ending.value,
        reason,
        later,
        2,
    )


def test_a_deleted_file_has_no_state() -> None:
    with pytest.raises(ValueError, match="no state"):
        a_file().settled(Settlement("f1", Ending.DELETED, "", AT))
    assert Ending.DELETED.discards_content
    assert Ending.EXPIRED.discards_content
    assert not Ending.AVAILABLE.discards_content


# --- downloads and URLs --------------------------------------------------------------------------


def test_content_disposition_is_an_attachment_with_a_safe_name() -> None:
    file = a_file(display_name='ECG "März".bin')

    assert content_disposition(file) == (
        "attachment; filename=\"ECG _M_rz_.bin\"; filename*=UTF-8''ECG%20%22M%C3%A4rz%22.bin"
    )
    assert content_disposition(a_file(display_name="")).startswith('attachment; filename="f1";')


def test_url_lifetime() -> None:
    assert url_lifetime(AT + timedelta(hours=1), AT) == timedelta(hours=1)
    assert url_lifetime(AT + timedelta(days=30), AT) == timedelta(days=7)  # SigV4's limit
    assert url_lifetime(AT, AT) is None


def test_the_data_organization_is_the_care_organization_if_any() -> None:
    assert DeviceAssignment("devices/d", "organizations/m", "organizations/c").data_organization == "organizations/c"
    assert DeviceAssignment("devices/d", "organizations/m").data_organization == "organizations/m"
