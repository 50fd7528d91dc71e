"""WebSocket <-> TCP bridge (websockify-compatible) and the noVNC client it serves."""
