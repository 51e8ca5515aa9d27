"""Supervised backend processes: one per distinct BackendSpec."""
