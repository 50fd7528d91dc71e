"""Sans-I/O protocol code: no sockets, no asyncio, no clocks."""
