"""tuneserve: fine-tune LoRA adapters in-process and serve generation with them over gRPC.

Layout, in the direction data flows:
    api (gRPC, thin) -> jobs (queue + state machine, persisted) -> training (recipe)
        -> registry (adapters on disk, atomic) -> inference (adapter cache + decoding) -> api

The core packages (jobs, training, registry, inference, data) never import grpc or the
generated protobuf code; the api package never imports torch.
"""

__version__ = "0.1.0"
