"""gRPC servicers: translate protobuf <-> domain, nothing else."""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import empty_pb2

from medmesh.file.v1 import file_service_pb2 as pb
from medmesh.file.v1 import file_service_pb2_grpc as pb_grpc
from medmesh.runtime.protoconv import timestamp
from services.file.domain import File, FileDraft, FileState
from services.file.service import CreatedFile, FileService, UploadTarget

_STATE_TO_PB = {
    FileState.PENDING: pb.File.STATE_PENDING,
    FileState.AVAILABLE: pb.File.STATE_AVAILABLE,
    FileState.FAILED: pb.File.STATE_FAILED,
    FileState.EXPIRED: pb.File.STATE_EXPIRED,
}


def to_pb(file: File) -> pb.File:
    message = pb.File(
        name=file.name,
        display_name=file.display_name,
        content_type=file.content_type,
        size_bytes=file.size_bytes,
        sha256=file.sha256,
        device=file.device,
        patient=file.patient,
        session=file.session,
        organization=file.organization,
        state=_STATE_TO_PB[file.state],
        failure_reason=file.failure_reason,
        create_time=timestamp(file.create_time),
        upload_expire_time=timestamp(file.upload_expire_time),
        etag=file.etag,
    )
    if file.complete_time is not None:
        message.complete_time.CopyFrom(timestamp(file.complete_time))
    return message


def upload_to_pb(upload: UploadTarget) -> pb.Upload:
    return pb.Upload(
        single_url=upload.single_url,
        parts=[pb.UploadPart(part_number=number, url=url) for number, url in upload.parts],
        part_size=upload.part_size,
        expire_time=timestamp(upload.expire_time),
    )


def created_to_pb(created: CreatedFile) -> pb.CreateFileResponse:
    response = pb.CreateFileResponse(file=to_pb(created.file))
    if created.upload is not None:
        response.upload.CopyFrom(upload_to_pb(created.upload))
    return response


def draft_from_pb(file: pb.File) -> FileDraft:
    return FileDraft(
        content_type=file.content_type,
        size_bytes=file.size_bytes,
        sha256=file.sha256,
        display_name=file.display_name,
        device=file.device,
        patient=file.patient,
        session=file.session,
        organization=file.organization,
    )


def parts_from_pb(parts: Iterable[pb.CompletedPart]) -> list[tuple[int, str]]:
    return [(part.part_number, part.etag) for part in parts]


class FileServicer(pb_grpc.FileServiceServicer):
    def __init__(self, service: FileService) -> None:
        self._service = service

    async def CreateFile(
        self, request: pb.CreateFileRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateFileResponse:
        return created_to_pb(await self._service.create(draft_from_pb(request.file), request.request_id))

    async def CompleteFile(self, request: pb.CompleteFileRequest, context: grpc.aio.ServicerContext) -> pb.File:
        return to_pb(await self._service.complete(request.name, parts_from_pb(request.parts)))

    async def GetFile(self, request: pb.GetFileRequest, context: grpc.aio.ServicerContext) -> pb.File:
        return to_pb(await self._service.get(request.name))

    async def ListFiles(self, request: pb.ListFilesRequest, context: grpc.aio.ServicerContext) -> pb.ListFilesResponse:
        page = await self._service.list_files(request.parent, request.filter, request.page_size, request.page_token)
        return pb.ListFilesResponse(files=[to_pb(f) for f in page.files], next_page_token=page.next_page_token)

    async def GetFileDownloadUrl(
        self, request: pb.GetFileDownloadUrlRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetFileDownloadUrlResponse:
        download = await self._service.download_url(request.name)
        return pb.GetFileDownloadUrlResponse(url=download.url, expire_time=timestamp(download.expire_time))

    async def DeleteFile(self, request: pb.DeleteFileRequest, context: grpc.aio.ServicerContext) -> empty_pb2.Empty:
        await self._service.delete(request.name, request.etag)
        return empty_pb2.Empty()


class FileInternalServicer(pb_grpc.FileInternalServiceServicer):
    def __init__(self, service: FileService) -> None:
        self._service = service

    async def CreateDeviceFile(
        self, request: pb.CreateDeviceFileRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateFileResponse:
        draft = FileDraft(
            content_type=request.content_type,
            size_bytes=request.size_bytes,
            sha256=request.sha256,
            display_name=request.display_name,
            session=request.session,
        )
        return created_to_pb(await self._service.create_for_device(request.device, draft, request.request_id))

    async def CompleteDeviceFile(
        self, request: pb.CompleteDeviceFileRequest, context: grpc.aio.ServicerContext
    ) -> pb.File:
        file = await self._service.complete_for_device(request.device, request.name, parts_from_pb(request.parts))
        return to_pb(file)

    async def SweepExpiredUploads(
        self, request: pb.SweepExpiredUploadsRequest, context: grpc.aio.ServicerContext
    ) -> pb.SweepExpiredUploadsResponse:
        expired = await self._service.sweep_expired(request.max_files)
        return pb.SweepExpiredUploadsResponse(expired_files=[f.name for f in expired])
