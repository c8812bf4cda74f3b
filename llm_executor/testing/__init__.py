"""Test helpers for users' own pipelines (the provider emulator lands with issue 5)."""
