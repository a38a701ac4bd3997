"""Defaults of what a served study lets one address, and a session, hold (shared by the app, the store and the CLI)."""

__all__ = ["ABANDON_AFTER_S", "SESSIONS_PER_ADDRESS", "ADDRESS_WINDOW_S"]

ABANDON_AFTER_S = 2 * 3600  # a session with no answer for 2 hours no longer holds a place
SESSIONS_PER_ADDRESS, ADDRESS_WINDOW_S = 20, 3600  # new sessions one client address may start per hour
