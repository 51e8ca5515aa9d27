"""Configs for the tools users already run against the gateway (OpenCode)."""
