"""Data plane for raw ports.

- ``tcp``: userspace TCP relay (asyncio Protocols, backpressure, half-close, RST).
- ``udp``: userspace UDP relay (a flow per client address, idle expiry, a cap on flows).
- ``spec``: ``-p`` port-forward specs in the docker/podman syntax.
Kernel forwards (nftables DNAT) live in :mod:`sandport.net.nft`.
"""
