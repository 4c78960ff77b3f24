"""The frontend: OpenAI API, admin API, router, scheduler, reconciler and health monitor."""
