"""Reading google.rpc.Status details in tests: the ErrorInfo and BadRequest a service sends
(RetryInfo, sent with RESOURCE_EXHAUSTED, is checked where it matters and skipped here)."""

from __future__ import annotations

from google.rpc import error_details_pb2, status_pb2

Details = tuple[list[error_details_pb2.ErrorInfo], list[error_details_pb2.BadRequest]]


def unpack_details(status: status_pb2.Status) -> Details:
    """Every detail unpacked; any other type fails the test, since services send only these two."""
    infos, bad_requests = [], []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            bad_requests.append(bad_request)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            continue
        else:
            raise AssertionError(f"unexpected detail {detail.type_url}")
    return infos, bad_requests
