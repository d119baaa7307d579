"""Generated gRPC/protobuf stubs for protos/vitrine/v1 (made by `make protos`)."""
