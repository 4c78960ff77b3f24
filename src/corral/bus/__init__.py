"""Messaging over NATS: subjects, message models and the one wrapper around nats-py."""
