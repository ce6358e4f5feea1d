"""Generated gRPC/protobuf modules for the SPIFFE Workload API (see README.md)."""
