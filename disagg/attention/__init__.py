"""Attention: the per-call metadata protocol, per-layer attention kinds, and backends."""
