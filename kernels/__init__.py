"""Triton kernels, each with a shape-checking wrapper and a pure-torch reference.

Every module holds one op: the wrapper (checks shapes, dtypes and devices; a bad call is a
`ValueError`), its `@triton.jit` kernel(s) and `<op>_ref` in plain torch. `kernels.config`
holds the one switch that routes every wrapper to its reference. This package imports only
torch and triton (tests/test_layering.py checks it); import the op modules directly, e.g.
`from kernels.decode_attention import decode_attention`, so that importing `kernels` alone
does not import triton.
"""
