"""Messages as bytes: the wire format, payload codecs and a simulated V2X channel."""
from .message import Message, MessageError, as_numpy, decode, encode, overhead_bytes

__all__ = ["Message", "MessageError", "as_numpy", "decode", "encode", "overhead_bytes"]
