"""Guests' consoles: one-time tokens (``tokens``) and the websocket proxy (``proxy``) that
relays a noVNC client to a guest's VNC server, or a websocket to its serial console."""

from fastcompute.console.proxy import ConsoleProxy
from fastcompute.console.tokens import Grant, Refused, Tokens

__all__ = ["ConsoleProxy", "Grant", "Refused", "Tokens"]
