"""The layer the draft and verify services share: engine base, sequence store, prefix KV,
batcher, config and start-up, servicer base. Imports `kernels` and the contract, never a
service (see README.md here)."""
