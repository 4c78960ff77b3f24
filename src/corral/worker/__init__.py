"""The worker: registers with a frontend, heartbeats, and supervises backend processes."""
