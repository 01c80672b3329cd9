"""The gRPC protos: committed modules are protoc's output, and the wire format is Triton's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor, descriptor_pool
from tritonclient.grpc import service_pb2 as triton

from service.grpc.proto import generate, model_config_pb2
from service.grpc.proto import grpc_service_pb2 as ours

COMMITTED = Path(generate.__file__).parent


def test_committed_modules_match_a_fresh_generation(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)
    assert sorted(p.name for p in written) == sorted(generate.OUTPUTS)
    for path in written:
        committed = (COMMITTED / path.name).read_text()
        assert path.read_text() == committed, f"{path.name} is stale: run `make grpc-stubs`"


def _messages(container: descriptor.FileDescriptor) -> Iterator[descriptor.Descriptor]:
    stack = list(container.message_types_by_name.values())
    while stack:
        message = stack.pop()
        yield message
        stack.extend(message.nested_types)


def _shape(field: descriptor.FieldDescriptor) -> tuple[object, ...]:
    """What decides a field's bytes on the wire, and what it decodes to."""
    return (
        field.number,
        field.type,
        field.is_repeated,
        field.message_type.full_name if field.message_type else None,
        field.enum_type.full_name if field.enum_type else None,
        field.containing_oneof.name if field.containing_oneof else None,
    )


@pytest.mark.parametrize(
    "ours_file",
    [
        pytest.param(ours.DESCRIPTOR, id="grpc_service"),
        pytest.param(model_config_pb2.DESCRIPTOR, id="model_config"),
    ],
)
def test_every_message_field_is_tritons(ours_file: descriptor.FileDescriptor) -> None:
    tritons = descriptor_pool.Default()  # where tritonclient.grpc registered its protos
    for message in _messages(ours_file):
        theirs = tritons.FindMessageTypeByName(message.full_name)
        for field in message.fields:
            assert field.name in theirs.fields_by_name, f"{message.full_name}.{field.name}"
            expected = _shape(theirs.fields_by_name[field.name])
            assert _shape(field) == expected, f"{message.full_name}.{field.name}"


def test_data_types_are_tritons() -> None:
    theirs = descriptor_pool.Default().FindEnumTypeByName("inference.DataType")
    mine = model_config_pb2.DESCRIPTOR.enum_types_by_name["DataType"]
    assert {v.name: v.number for v in mine.values} == {v.name: v.number for v in theirs.values}


def test_every_rpc_is_tritons() -> None:
    theirs = triton.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    service = ours.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    for method in service.methods:
        triton_method = theirs.methods_by_name[method.name]
        for side in ("input_type", "output_type"):
            assert getattr(method, side).full_name == getattr(triton_method, side).full_name
        assert method.client_streaming == triton_method.client_streaming
        assert method.server_streaming == triton_method.server_streaming
