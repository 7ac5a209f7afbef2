"""Tests of the example clients in examples/ against a real router and worker."""
