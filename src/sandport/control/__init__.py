"""Control plane: the gateway and its rooms (sandboxes, readiness, access), the store,
the HTTP app and API; :mod:`sandport.control.gateway` says which module owns what."""
