"""KV transports: prefill publishes a request's KV under a lease, decode pulls it.

Each backend implements the small protocols of ``base``; the engines see nothing else.
Ray may be imported only by backends that use it.
"""
