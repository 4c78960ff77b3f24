"""Backend catalog and the backend servers that ship with Corral."""
