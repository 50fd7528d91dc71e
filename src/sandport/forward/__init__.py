"""Data plane for raw ports.

- ``tcp``: userspace TCP relay (splice through a pipe per direction, recv/send fallback;
  backpressure, half-close, RST, limits, PROXY protocol).
- ``udp``: userspace UDP relay (a flow per client address, idle expiry, a cap on flows).
- ``spec``: ``-p`` port-forward specs in the docker/podman syntax.
Kernel forwards (nftables DNAT) live in :mod:`sandport.net.nft`.
"""
