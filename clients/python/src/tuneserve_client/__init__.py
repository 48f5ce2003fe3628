"""tuneserve's Python client: grpcio and protobuf only, no torch.

This package also owns the generated API code (`tuneserve_client.v1`, built from
proto/ by `make proto`): the server imports it from here, so a process that runs both
holds one copy of the descriptors."""

from tuneserve_client.client import DEFAULT, FINAL_STATES, TuneserveClient
from tuneserve_client.errors import ClientError
from tuneserve_client.progress import progress_printer
from tuneserve_client.retry import RetryPolicy
from tuneserve_client.routing import RoutedClient, Router, RoutingPolicy, rank_replicas

__all__ = [
    "DEFAULT",
    "FINAL_STATES",
    "ClientError",
    "RetryPolicy",
    "RoutedClient",
    "Router",
    "RoutingPolicy",
    "TuneserveClient",
    "progress_printer",
    "rank_replicas",
]
