"""Generated gRPC stubs of proto/phishgate/v1/*.proto (`make proto`); never edit them."""
