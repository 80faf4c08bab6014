"""python -m specmesh.verify_service --model DIR [--port P] ... (also `specmesh serve verify`)."""

from specmesh.model_service.openmp import tune_openmp

tune_openmp()  # before anything imports torch (libgomp reads its environment once)

from specmesh.model_service.startup import ServiceSpec, main  # noqa: E402
from specmesh.v1 import verify_pb2, verify_pb2_grpc  # noqa: E402
from specmesh.verify_service.engine import VerifyEngine  # noqa: E402
from specmesh.verify_service.servicer import VerifyServicer  # noqa: E402

SPEC = ServiceSpec("specmesh serve verify", verify_pb2, "VerifyService",
                   verify_pb2_grpc.add_VerifyServiceServicer_to_server, VerifyEngine,
                   VerifyEngine.verify_batch, VerifyServicer)
SERVICE_NAME = SPEC.full_name

if __name__ == "__main__":
    main(SPEC)
