"""The scheduler: requests, the KV-cache manager, policies and the step loop's batch building."""
