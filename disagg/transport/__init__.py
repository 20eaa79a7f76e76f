"""KV transports: decode names where a request's KV goes, prefill writes it there layer by layer.

Each backend implements the small protocols of ``base``; the engines see nothing else.
Ray may be imported only by backends that use it.
"""
