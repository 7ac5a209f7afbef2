"""Router tests: radix tree and load-balancing policies."""
