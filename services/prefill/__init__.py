"""Prefill worker: computes a prompt's KV and writes it into a decode worker's reserved pages."""
