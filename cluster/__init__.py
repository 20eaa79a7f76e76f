"""How the service is placed and launched on Ray clusters (cluster/README.md)."""
