"""Thin Ray Serve adapters around the engines: config, ingress, servers, ``build_app``."""
