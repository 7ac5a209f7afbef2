"""Pieces every gRPC service shares: proto <-> domain conversion and the error taxonomy."""
