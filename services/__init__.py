"""Tandem's services (gateway, router, prefill, decode) and the `tandem` command line."""
