"""Decode worker: reserves KV pages for a prompt, lets a prefill worker fill them, streams tokens."""
