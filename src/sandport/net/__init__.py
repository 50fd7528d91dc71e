"""Host networking: netlink (pyroute2), the IP pool. Idempotent and reconciled."""
