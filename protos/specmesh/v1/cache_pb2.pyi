from specmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LookupPrefixRequest(_message.Message):
    __slots__ = ("fingerprint", "token_ids", "chunk_size")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    chunk_size: int
    def __init__(self, fingerprint: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class LookupPrefixResponse(_message.Message):
    __slots__ = ("num_tokens", "chunk_keys")
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_KEYS_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    chunk_keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, num_tokens: _Optional[int] = ..., chunk_keys: _Optional[_Iterable[str]] = ...) -> None: ...

class GetChunksRequest(_message.Message):
    __slots__ = ("fingerprint", "chunk_keys")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_KEYS_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    chunk_keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, fingerprint: _Optional[str] = ..., chunk_keys: _Optional[_Iterable[str]] = ...) -> None: ...

class ChunkMeta(_message.Message):
    __slots__ = ("dtype", "shape", "num_bytes", "sha256", "mac")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    num_bytes: int
    sha256: bytes
    mac: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., num_bytes: _Optional[int] = ..., sha256: _Optional[bytes] = ..., mac: _Optional[bytes] = ...) -> None: ...

class ChunkPiece(_message.Message):
    __slots__ = ("index", "meta", "offset", "data")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    index: int
    meta: ChunkMeta
    offset: int
    data: bytes
    def __init__(self, index: _Optional[int] = ..., meta: _Optional[_Union[ChunkMeta, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutChunksHeader(_message.Message):
    __slots__ = ("fingerprint", "token_ids", "chunk_size", "start_chunk")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    START_CHUNK_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    chunk_size: int
    start_chunk: int
    def __init__(self, fingerprint: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., chunk_size: _Optional[int] = ..., start_chunk: _Optional[int] = ...) -> None: ...

class PutChunksRequest(_message.Message):
    __slots__ = ("header", "piece")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PIECE_FIELD_NUMBER: _ClassVar[int]
    header: PutChunksHeader
    piece: ChunkPiece
    def __init__(self, header: _Optional[_Union[PutChunksHeader, _Mapping]] = ..., piece: _Optional[_Union[ChunkPiece, _Mapping]] = ...) -> None: ...

class PutChunksResponse(_message.Message):
    __slots__ = ("num_stored", "num_skipped")
    NUM_STORED_FIELD_NUMBER: _ClassVar[int]
    NUM_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    num_stored: int
    num_skipped: int
    def __init__(self, num_stored: _Optional[int] = ..., num_skipped: _Optional[int] = ...) -> None: ...

class ResultKey(_message.Message):
    __slots__ = ("draft_fingerprint", "target_fingerprint", "prompt_token_ids", "sampling", "max_new_tokens", "stop", "ignore_eos", "extra")
    DRAFT_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    draft_fingerprint: str
    target_fingerprint: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    max_new_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    extra: str
    def __init__(self, draft_fingerprint: _Optional[str] = ..., target_fingerprint: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ..., extra: _Optional[str] = ...) -> None: ...

class GetResultRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: ResultKey
    def __init__(self, key: _Optional[_Union[ResultKey, _Mapping]] = ...) -> None: ...

class GetResultResponse(_message.Message):
    __slots__ = ("hit", "token_ids", "finish_reason", "mac")
    HIT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    hit: bool
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    mac: bytes
    def __init__(self, hit: _Optional[bool] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., mac: _Optional[bytes] = ...) -> None: ...

class PutResultRequest(_message.Message):
    __slots__ = ("key", "token_ids", "finish_reason", "mac")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    key: ResultKey
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: str
    mac: bytes
    def __init__(self, key: _Optional[_Union[ResultKey, _Mapping]] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[str] = ..., mac: _Optional[bytes] = ...) -> None: ...

class PutResultResponse(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: bool
    def __init__(self, stored: _Optional[bool] = ...) -> None: ...

class PutNgramsRequest(_message.Message):
    __slots__ = ("fingerprint", "token_ids", "first_position", "end_position", "min_n", "max_n", "max_depth")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_POSITION_FIELD_NUMBER: _ClassVar[int]
    END_POSITION_FIELD_NUMBER: _ClassVar[int]
    MIN_N_FIELD_NUMBER: _ClassVar[int]
    MAX_N_FIELD_NUMBER: _ClassVar[int]
    MAX_DEPTH_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    first_position: int
    end_position: int
    min_n: int
    max_n: int
    max_depth: int
    def __init__(self, fingerprint: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., first_position: _Optional[int] = ..., end_position: _Optional[int] = ..., min_n: _Optional[int] = ..., max_n: _Optional[int] = ..., max_depth: _Optional[int] = ...) -> None: ...

class PutNgramsResponse(_message.Message):
    __slots__ = ("num_ngrams",)
    NUM_NGRAMS_FIELD_NUMBER: _ClassVar[int]
    num_ngrams: int
    def __init__(self, num_ngrams: _Optional[int] = ...) -> None: ...

class NgramContext(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GetNgramsRequest(_message.Message):
    __slots__ = ("fingerprint", "contexts", "max_continuations")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CONTEXTS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTINUATIONS_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    contexts: _containers.RepeatedCompositeFieldContainer[NgramContext]
    max_continuations: int
    def __init__(self, fingerprint: _Optional[str] = ..., contexts: _Optional[_Iterable[_Union[NgramContext, _Mapping]]] = ..., max_continuations: _Optional[int] = ...) -> None: ...

class NgramContinuation(_message.Message):
    __slots__ = ("token_ids", "count")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    count: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., count: _Optional[int] = ...) -> None: ...

class NgramEntry(_message.Message):
    __slots__ = ("continuations",)
    CONTINUATIONS_FIELD_NUMBER: _ClassVar[int]
    continuations: _containers.RepeatedCompositeFieldContainer[NgramContinuation]
    def __init__(self, continuations: _Optional[_Iterable[_Union[NgramContinuation, _Mapping]]] = ...) -> None: ...

class GetNgramsResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[NgramEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[NgramEntry, _Mapping]]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OpLatency(_message.Message):
    __slots__ = ("op", "count", "mean_ms", "max_ms")
    OP_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MEAN_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_MS_FIELD_NUMBER: _ClassVar[int]
    op: str
    count: int
    mean_ms: float
    max_ms: float
    def __init__(self, op: _Optional[str] = ..., count: _Optional[int] = ..., mean_ms: _Optional[float] = ..., max_ms: _Optional[float] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("prefix_hits", "prefix_misses", "prefix_tokens_hit", "chunks_read", "chunks_written", "chunks_rejected", "chunks_skipped", "result_hits", "result_misses", "results_written", "results_skipped", "bytes_read", "bytes_written", "errors", "latency", "ngram_lookups", "ngram_hits", "ngrams_written")
    PREFIX_HITS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_MISSES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_HIT_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_READ_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    RESULT_HITS_FIELD_NUMBER: _ClassVar[int]
    RESULT_MISSES_FIELD_NUMBER: _ClassVar[int]
    RESULTS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    RESULTS_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    NGRAM_LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    NGRAM_HITS_FIELD_NUMBER: _ClassVar[int]
    NGRAMS_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    prefix_hits: int
    prefix_misses: int
    prefix_tokens_hit: int
    chunks_read: int
    chunks_written: int
    chunks_rejected: int
    chunks_skipped: int
    result_hits: int
    result_misses: int
    results_written: int
    results_skipped: int
    bytes_read: int
    bytes_written: int
    errors: int
    latency: _containers.RepeatedCompositeFieldContainer[OpLatency]
    ngram_lookups: int
    ngram_hits: int
    ngrams_written: int
    def __init__(self, prefix_hits: _Optional[int] = ..., prefix_misses: _Optional[int] = ..., prefix_tokens_hit: _Optional[int] = ..., chunks_read: _Optional[int] = ..., chunks_written: _Optional[int] = ..., chunks_rejected: _Optional[int] = ..., chunks_skipped: _Optional[int] = ..., result_hits: _Optional[int] = ..., result_misses: _Optional[int] = ..., results_written: _Optional[int] = ..., results_skipped: _Optional[int] = ..., bytes_read: _Optional[int] = ..., bytes_written: _Optional[int] = ..., errors: _Optional[int] = ..., latency: _Optional[_Iterable[_Union[OpLatency, _Mapping]]] = ..., ngram_lookups: _Optional[int] = ..., ngram_hits: _Optional[int] = ..., ngrams_written: _Optional[int] = ...) -> None: ...
