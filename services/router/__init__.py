"""The router: chooses the prefill and decode workers for each request (policies in `policies/`)."""
