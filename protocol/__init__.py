"""Messages between the HTTP servers and the engine process (msgpack over ZeroMQ).

Plain Python only: no torch and no event loop, so both sides import it cheaply.
"""
