"""tuneserve's Python client: grpcio and protobuf only, no torch.

This package also owns the generated API code (`tuneserve_client.v1`, built from
proto/ by `make proto`): the server imports it from here, so a process that runs both
holds one copy of the descriptors."""

from tuneserve_client.client import FINAL_STATES, ClientError, TuneserveClient

__all__ = ["FINAL_STATES", "ClientError", "TuneserveClient"]
