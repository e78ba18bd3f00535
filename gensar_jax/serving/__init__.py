"""Serving: the exported artifact, the engine that runs it, and the HTTP server."""
