from specmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ProposeRequest(_message.Message):
    __slots__ = ("header", "tree_spec", "sampling", "finished_sequence_ids")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TREE_SPEC_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    FINISHED_SEQUENCE_IDS_FIELD_NUMBER: _ClassVar[int]
    header: _common_pb2.SequenceHeader
    tree_spec: _common_pb2.TreeSpec
    sampling: _common_pb2.SamplingParams
    finished_sequence_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, header: _Optional[_Union[_common_pb2.SequenceHeader, _Mapping]] = ..., tree_spec: _Optional[_Union[_common_pb2.TreeSpec, _Mapping]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., finished_sequence_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ProposeResponse(_message.Message):
    __slots__ = ("tree", "draft_dists", "num_cached_tokens")
    TREE_FIELD_NUMBER: _ClassVar[int]
    DRAFT_DISTS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    tree: _common_pb2.TokenTree
    draft_dists: _containers.RepeatedCompositeFieldContainer[_common_pb2.SparseDistribution]
    num_cached_tokens: int
    def __init__(self, tree: _Optional[_Union[_common_pb2.TokenTree, _Mapping]] = ..., draft_dists: _Optional[_Iterable[_Union[_common_pb2.SparseDistribution, _Mapping]]] = ..., num_cached_tokens: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("sequence_ids",)
    SEQUENCE_IDS_FIELD_NUMBER: _ClassVar[int]
    sequence_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sequence_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("num_released",)
    NUM_RELEASED_FIELD_NUMBER: _ClassVar[int]
    num_released: int
    def __init__(self, num_released: _Optional[int] = ...) -> None: ...

class ProposeBatchRequest(_message.Message):
    __slots__ = ("requests", "finished_sequence_ids")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_SEQUENCE_IDS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[ProposeRequest]
    finished_sequence_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, requests: _Optional[_Iterable[_Union[ProposeRequest, _Mapping]]] = ..., finished_sequence_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ProposeResult(_message.Message):
    __slots__ = ("response", "error")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    response: ProposeResponse
    error: _common_pb2.ItemError
    def __init__(self, response: _Optional[_Union[ProposeResponse, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.ItemError, _Mapping]] = ...) -> None: ...

class ProposeBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ProposeResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ProposeResult, _Mapping]]] = ...) -> None: ...
