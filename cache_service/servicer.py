"""CacheService servicer: proto <-> engine types only (and the reassembly of streamed pieces)."""

from __future__ import annotations

import dataclasses

from specmesh.cache_service.codec import CachedResult, ChunkData, expected_bytes, make_chunk
from specmesh.cache_service.engine import CacheEngine
from specmesh.cache_service.keys import ResultKeyFields
from specmesh.cache_service.ngrams import check_put
from specmesh.cache_service.stats import CacheStats
from specmesh.v1 import cache_pb2, cache_pb2_grpc
from specmesh.wire.errors import InvalidRequest, SpecMeshError, status_code


def result_fields(key: cache_pb2.ResultKey) -> ResultKeyFields:
    s = key.sampling
    return ResultKeyFields(
        draft_fingerprint=key.draft_fingerprint, target_fingerprint=key.target_fingerprint,
        prompt_token_ids=tuple(key.prompt_token_ids), temperature=s.temperature,
        top_p=s.top_p if s.HasField("top_p") else 1.0, top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None, max_new_tokens=key.max_new_tokens,
        stop=tuple(key.stop), ignore_eos=key.ignore_eos, extra=key.extra)


def chunk_meta(chunk: ChunkData) -> cache_pb2.ChunkMeta:
    return cache_pb2.ChunkMeta(dtype=chunk.dtype, shape=chunk.shape, num_bytes=chunk.num_bytes,
                               sha256=chunk.sha256, mac=chunk.mac)


def stats_response(s: CacheStats) -> cache_pb2.StatsResponse:
    latency = [cache_pb2.OpLatency(op=op, count=lat.count, mean_ms=1e3 * lat.total_s / lat.count,
                                   max_ms=1e3 * lat.max_s)
               for op, lat in sorted(s.latency.items()) if lat.count]
    return cache_pb2.StatsResponse(
        prefix_hits=s.prefix_hits, prefix_misses=s.prefix_misses,
        prefix_tokens_hit=s.prefix_tokens_hit, chunks_read=s.chunks_read,
        chunks_written=s.chunks_written, chunks_rejected=s.chunks_rejected,
        chunks_skipped=s.chunks_skipped, result_hits=s.result_hits,
        result_misses=s.result_misses, results_written=s.results_written,
        results_skipped=s.results_skipped, bytes_read=s.bytes_read,
        bytes_written=s.bytes_written, errors=s.errors, latency=latency,
        ngram_lookups=s.ngram_lookups, ngram_hits=s.ngram_hits, ngrams_written=s.ngrams_written)


class ChunkAssembler:
    """Turns the pieces of a PutChunks stream back into whole chunks, checking order and sizes.

    `feed` returns (index, ChunkData) when a chunk completes, (index, None) when a chunk over
    the size cap completes (its bytes were not kept), and None otherwise.
    """

    def __init__(self, num_chunks: int, fits):
        self.num_chunks = num_chunks  # chunks the header's tokens can key
        self.fits = fits  # num_bytes -> bool (the engine's size cap)
        self.index = -1
        self.meta: cache_pb2.ChunkMeta | None = None
        self.buf: bytearray | None = None
        self.received = 0

    @property
    def open(self) -> bool:
        return self.meta is not None

    def feed(self, piece: cache_pb2.ChunkPiece) -> tuple[int, ChunkData | None] | None:
        if piece.HasField("meta"):
            self._begin(piece)
        elif not self.open or piece.index != self.index:
            raise InvalidRequest("piece.meta", f"first piece of chunk {piece.index} lacks meta")
        if piece.offset != self.received:
            raise InvalidRequest("piece.offset", f"{piece.offset}, expected {self.received}")
        end = self.received + len(piece.data)
        if end > self.meta.num_bytes:
            raise InvalidRequest("piece.data", f"chunk {self.index} exceeds its "
                                 f"{self.meta.num_bytes} bytes")
        if self.buf is not None:
            self.buf += piece.data  # grows with what arrived (offsets checked above)
        self.received = end
        return self._finish() if end == self.meta.num_bytes else None

    def _begin(self, piece: cache_pb2.ChunkPiece) -> None:
        if self.open:
            raise InvalidRequest("piece.index", f"chunk {self.index} is incomplete")
        if piece.index != self.index + 1:
            raise InvalidRequest("piece.index", f"{piece.index}, expected {self.index + 1}")
        if piece.index >= self.num_chunks:
            raise InvalidRequest("piece.index", f"chunk {piece.index} is past the full chunks of "
                                 "header.token_ids")
        meta = piece.meta
        try:
            size = expected_bytes(meta.dtype, tuple(meta.shape))
        except ValueError as exc:
            raise InvalidRequest("piece.meta", str(exc)) from None
        if meta.num_bytes != size:
            raise InvalidRequest("piece.meta.num_bytes", f"{meta.num_bytes}, dtype x shape "
                                 f"makes {size}")
        if meta.sha256 and len(meta.sha256) != 32:
            raise InvalidRequest("piece.meta.sha256", "must be 32 bytes or empty")
        self.index, self.meta, self.received = piece.index, meta, 0
        # nothing is reserved for the declared size: an idle stream holds no memory
        self.buf = bytearray() if self.fits(size) else None

    def _finish(self) -> tuple[int, ChunkData | None]:
        meta, buf, self.meta, self.buf = self.meta, self.buf, None, None
        if buf is None:
            return self.index, None
        chunk = dataclasses.replace(make_chunk(meta.dtype, tuple(meta.shape), bytes(buf)),
                                    mac=meta.mac)
        if meta.sha256 and meta.sha256 != chunk.sha256:
            raise InvalidRequest("piece.meta.sha256", f"chunk {self.index} does not match")
        return self.index, chunk


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    def __init__(self, engine: CacheEngine, piece_bytes: int):
        self.engine = engine
        self.piece_bytes = piece_bytes

    async def LookupPrefix(self, request, context):
        hit = await self.engine.lookup_prefix(request.fingerprint, list(request.token_ids),
                                              request.chunk_size)
        return cache_pb2.LookupPrefixResponse(num_tokens=hit.num_tokens, chunk_keys=hit.keys)

    async def GetChunks(self, request, context):
        index = 0
        async for chunk in self.engine.get_chunks(request.fingerprint, list(request.chunk_keys)):
            view = memoryview(chunk.data)
            for offset in range(0, chunk.num_bytes, self.piece_bytes):
                yield cache_pb2.ChunkPiece(
                    index=index, meta=chunk_meta(chunk) if offset == 0 else None, offset=offset,
                    data=bytes(view[offset:offset + self.piece_bytes]))
            index += 1

    async def PutChunks(self, request_iterator, context):
        # The shared error interceptor covers unary and server-streaming handlers only.
        try:
            return await self._put_chunks(request_iterator)
        except SpecMeshError as exc:
            await context.abort(status_code(exc), str(exc))

    async def _put_chunks(self, request_iterator) -> cache_pb2.PutChunksResponse:
        header, assembler, keys = None, None, []
        stored = skipped = 0
        async for message in request_iterator:
            if header is None:
                if message.WhichOneof("part") != "header":
                    raise InvalidRequest("header", "the first PutChunks message must be a header")
                header = message.header
                keys = await self._put_keys(header)
                assembler = ChunkAssembler(len(keys), self.engine.chunk_fits)
                continue
            if message.WhichOneof("part") != "piece":
                raise InvalidRequest("piece", "only the first message may be a header")
            done = assembler.feed(message.piece)
            if done is not None:
                index, chunk = done
                if chunk is not None and await self.engine.put_chunk(header.fingerprint,
                                                                     keys[index], chunk):
                    stored += 1
                else:
                    skipped += 1
                    if chunk is None:
                        self.engine.skip_chunk()
        if header is None:
            raise InvalidRequest("header", "missing (empty PutChunks stream)")
        if assembler.open:
            raise InvalidRequest("piece", f"stream ended inside chunk {assembler.index}")
        return cache_pb2.PutChunksResponse(num_stored=stored, num_skipped=skipped)

    async def _put_keys(self, header: cache_pb2.PutChunksHeader) -> list[str]:
        """Keys of chunks start_chunk.. of the header's tokens."""
        keys = await self.engine.chunk_keys_async(header.fingerprint, list(header.token_ids),
                                                  header.chunk_size, where="header.")
        if not 0 <= header.start_chunk <= len(keys):
            raise InvalidRequest("header.start_chunk", f"{header.start_chunk} not in "
                                 f"[0, {len(keys)}] (full chunks of header.token_ids)")
        return keys[header.start_chunk:]

    async def GetResult(self, request, context):
        result = await self.engine.get_result(result_fields(request.key))
        if result is None:
            return cache_pb2.GetResultResponse(hit=False)
        return cache_pb2.GetResultResponse(hit=True, token_ids=result.token_ids,
                                           finish_reason=result.finish_reason, mac=result.mac)

    async def PutResult(self, request, context):
        stored = await self.engine.put_result(
            result_fields(request.key),
            CachedResult(tuple(request.token_ids), request.finish_reason, request.mac))
        return cache_pb2.PutResultResponse(stored=stored)

    async def PutNgrams(self, request, context):
        put = check_put(request.token_ids, request.first_position, request.end_position,
                        request.min_n, request.max_n, request.max_depth)
        num = await self.engine.put_ngrams(request.fingerprint, put)
        return cache_pb2.PutNgramsResponse(num_ngrams=num)

    async def GetNgrams(self, request, context):
        entries = await self.engine.get_ngrams(
            request.fingerprint, [list(c.token_ids) for c in request.contexts],
            request.max_continuations)
        return cache_pb2.GetNgramsResponse(entries=[
            cache_pb2.NgramEntry(continuations=[
                cache_pb2.NgramContinuation(token_ids=tokens, count=min(count, (1 << 32) - 1))
                for tokens, count in entry]) for entry in entries])

    async def Stats(self, request, context):
        return stats_response(self.engine.stats)

    async def close(self) -> None:
        await self.engine.close()
