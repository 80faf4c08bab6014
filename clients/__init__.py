"""specmesh clients: the async and sync client, scheduler, gateway and the `specmesh` CLI.

No torch, no kernels, no service imports: everything goes over gRPC.
"""
