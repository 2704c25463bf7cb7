"""The gRPC side: request checks, the generation service, error mapping, server assembly."""
