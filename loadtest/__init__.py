"""Load generation and benchmarks: the locust gRPC users and the `specmesh bench` harness."""
