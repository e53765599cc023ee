"""Prefect flows: thin wiring of the library's stage functions (no logic lives here)."""
