"""Benchmarks: peers side by side in one run, ratios printed.

The walking-path issue ships no benchmark yet; the port-forward and WebSocket-bridge
issues add theirs here (relay vs socat, kernel DNAT and pasta; bridge vs websockify).
"""

print("bench: no benchmarks yet (they arrive with the forward and bridge issues)")
