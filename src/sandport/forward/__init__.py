"""Data plane for raw ports: relays that move bytes from a host port to a guest service.

Each forward binds a host listener and relays every accepted connection to a target
address. The modules here only move bytes and apply backpressure; they do not parse
what they carry.

Modules:
    tcp: userspace TCP relay on asyncio Protocols/Transports (runs under uvloop).
"""
