"""The gRPC transport: converts protobuf to domain objects, calls the core once, converts
back, and maps domain errors to status codes in one table. Never imports torch."""
