"""What prefill, decode and unified workers share: the engine (in its own process) behind an
asyncio facade, WorkerService (info, load, unified generation), registration with the router,
gRPC health, and the command-line flags."""
