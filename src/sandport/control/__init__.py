"""Control plane: the gateway, its store, access tokens and the HTTP app."""
