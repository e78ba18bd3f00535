"""Dual-purpose item identifiers: embeddings in, semantic and collaborative IDs out."""
