"""python -m specmesh.draft_service --model DIR [--port P] ... (also `specmesh serve draft`)."""

from specmesh.model_service.openmp import tune_openmp

tune_openmp()  # before anything imports torch (libgomp reads its environment once)

from specmesh.draft_service.engine import DraftEngine  # noqa: E402
from specmesh.draft_service.ngram_fleet import ngram_options  # noqa: E402
from specmesh.draft_service.servicer import DraftServicer  # noqa: E402
from specmesh.model_service.startup import ServiceSpec, main  # noqa: E402
from specmesh.v1 import draft_pb2, draft_pb2_grpc  # noqa: E402

# The draft's own defaults: a small model needs a small KV cache, one thread (a second OpenMP
# thread's spinning took a core from the verify service beside it) and int8 projections (a
# draft step reads half the bytes; the output is the target's whatever the draft proposes).
# README.
DEFAULTS = {"kv_cache_mb": 256.0, "threads": 1, "quantize": "int8"}
SPEC = ServiceSpec("specmesh serve draft", draft_pb2, "DraftService",
                   draft_pb2_grpc.add_DraftServiceServicer_to_server, DraftEngine,
                   DraftEngine.propose_batch, DraftServicer, DEFAULTS, ngram_options)
SERVICE_NAME = SPEC.full_name

if __name__ == "__main__":
    main(SPEC)
